"""``arithmetic``: seeded GSM8K-style word problems with worked, calculator-annotated answers."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

# Vocabulary for the templates; kept as compact tables rather than one item per line.
# fmt: off
_NAMES = (
    "Aisha", "Ben", "Carlos", "Dana", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal",
    "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara",
    "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoe", "Liam", "Maya", "Noah", "Olivia",
    "Pedro", "Sofia", "Tomas", "Amara", "Diego", "Hana", "Ivan", "Leila", "Marco", "Nora",
)
_FRIEND_WORDS = ("friends", "classmates", "cousins", "teammates", "neighbors")
_SHOP_ITEMS = (
    "notebooks", "pens", "apples", "sandwiches", "toy cars", "candles", "mugs", "plant pots",
    "comic books", "juice boxes", "scarves", "puzzles", "lamps", "basketballs",
)
_SHARE_ITEMS = (
    "stickers", "cookies", "marbles", "crayons", "strawberries", "trading cards", "seashells",
    "beads", "chocolates", "pencils", "balloons", "grapes",
)
_CONTAINERS = ("boxes", "bags", "packs", "jars", "cartons", "tins")
_ACTIVITIES = (  # (3rd-person verb, unit, base verb)
    ("reads", "pages", "read"), ("types", "words", "type"), ("bakes", "muffins", "bake"),
    ("paints", "tiles", "paint"), ("knits", "rows", "knit"), ("folds", "paper cranes", "fold"),
    ("packs", "parcels", "pack"), ("plants", "seedlings", "plant"),
)
_VEHICLES = ("car", "bus", "train", "truck", "motorbike", "van")
_JOBS = ("tutor", "lifeguard", "cashier", "dog walker", "babysitter", "gardener", "barista")
_SALE_ITEMS = (
    "jacket", "bicycle", "guitar", "backpack", "pair of shoes", "tablet", "camera", "desk chair",
)
_GROUP_SPLITS = (  # (place, whole, part a, part b)
    ("school", "students", "girls", "boys"),
    ("orchard", "trees", "apple trees", "pear trees"),
    ("library", "books", "novels", "non-fiction books"),
    ("parking lot", "vehicles", "cars", "vans"),
    ("farm", "animals", "chickens", "goats"),
    ("concert", "people", "adults", "children"),
)
_RECIPES = (  # (food, ingredient)
    ("cookies", "cups of flour"), ("pancakes", "eggs"), ("muffins", "cups of milk"),
    ("bread rolls", "spoons of yeast"), ("brownies", "bars of chocolate"),
)
# fmt: on
_PLURAL_WORDS = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}
_SCALE_VERBS = {2: "doubles", 3: "triples", 4: "quadruples"}


def _calc(op: str, *operands: int) -> tuple[str, int]:
    """Evaluate ``operands`` folded left with ``op`` and render it GSM8K-style.

    Returns (``"a*b = <<a*b=c>>c"``, c). Guards keep every value a non-negative integer, which
    the templates rely on and the tests re-check by evaluating the annotation.
    """
    value = operands[0]
    for x in operands[1:]:
        if op == "+":
            value += x
        elif op == "-":
            value -= x
        elif op == "*":
            value *= x
        elif op == "/":
            if x == 0 or value % x:
                raise AssertionError(f"inexact division {value}/{x}")
            value //= x
        else:
            raise AssertionError(f"unsupported op {op!r}")
    if value < 0:
        raise AssertionError(f"negative intermediate value {value}")
    expr = op.join(str(x) for x in operands)
    return f"{expr} = <<{expr}={value}>>{value}", value


def _percent_of(base: int, pct: int) -> tuple[str, int]:
    """``base * pct / 100`` rendered as one annotation; callers pick ``base`` so it is exact."""
    if (base * pct) % 100:
        raise AssertionError(f"{pct}% of {base} is not whole")
    value = base * pct // 100
    expr = f"{base}*{pct}/100"
    return f"{expr} = <<{expr}={value}>>{value}", value


def _pick_names(rng: random.Random, k: int) -> list[str]:
    return rng.sample(_NAMES, k)


def _multiple_for_percent(pct: int) -> int:
    """Smallest base step so that ``pct`` percent of any multiple of it is an integer."""
    return 100 // math.gcd(pct, 100)


# Each template returns (question, worked-step lines, final answer); the final answer must be
# the value of the last annotation so the "#### N" line is checkable.
_Problem = tuple[str, list[str], int]


def _t_shopping(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    p1, p2 = rng.sample(_SHOP_ITEMS, 2)
    n1, n2 = rng.randint(2, 9), rng.randint(2, 9)
    c1, c2 = rng.randint(2, 25), rng.randint(2, 25)
    t1, v1 = _calc("*", n1, c1)
    t2, v2 = _calc("*", n2, c2)
    t3, total = _calc("+", v1, v2)
    steps = [
        f"The {p1} cost {t1} dollars.",
        f"The {p2} cost {t2} dollars.",
        f"Altogether {name} spends {t3} dollars.",
    ]
    question = f"{name} buys {n1} {p1} that cost ${c1} each and {n2} {p2} that cost ${c2} each."
    if rng.random() < 0.5:
        bill = (total // 50 + 1 + rng.randint(0, 2)) * 50
        t4, change = _calc("-", bill, total)
        steps.append(f"So {name} gets back {t4} dollars in change.")
        question += f" If {name} pays with ${bill}, how much change does {name} get?"
        return question, steps, change
    question += f" How much does {name} spend in total, in dollars?"
    return question, steps, total


def _t_sharing(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    item = rng.choice(_SHARE_ITEMS)
    container = rng.choice(_CONTAINERS)
    friends = rng.randint(2, 8)
    per_friend = rng.randint(2, 15)
    per_box = rng.randint(4, 24)
    # Enough boxes to cover the shares; whatever is left over is what the owner keeps, so the
    # shared part divides exactly by construction.
    boxes = -(-friends * per_friend // per_box) + rng.randint(0, 1)
    keep = boxes * per_box - friends * per_friend
    t1, total = _calc("*", boxes, per_box)
    question = f"{name} has {boxes} {container} of {item} with {per_box} {item} in each."
    steps = [f"{name} has {t1} {item}."]
    if keep:
        t2, rest = _calc("-", total, keep)
        question += f" {name} keeps {keep} {item} and shares the rest equally among {friends}"
        steps.append(f"After keeping some, {t2} {item} are left to share.")
    else:
        rest = total
        question += f" {name} shares them all equally among {friends}"
    word = rng.choice(_FRIEND_WORDS)
    t3, each = _calc("/", rest, friends)
    question += f" {word}. How many {item} does each of the {word} get?"
    steps.append(f"Each of the {word} gets {t3} {item}.")
    return question, steps, each


def _t_rate_time(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    verb, unit, base = rng.choice(_ACTIVITIES)
    rate = rng.randint(3, 30)
    if rng.random() < 0.5:
        hours = rng.randint(2, 6)
        days = rng.randint(2, 7)
        t1, per_day = _calc("*", rate, hours)
        t2, total = _calc("*", per_day, days)
        question = (
            f"{name} {verb} {rate} {unit} every hour. If {name} works {hours} hours a day for "
            f"{days} days, how many {unit} does {name} {base} in total?"
        )
        steps = [f"Each day {name} does {t1} {unit}.", f"In {days} days that is {t2} {unit}."]
        return question, steps, total
    # Inverse form: how long a job takes; build the job size as a multiple of the daily output.
    hours = rng.randint(2, 5)
    days = rng.randint(2, 12)
    done = rng.randint(0, 3) * rate * hours
    job = rate * hours * days + done
    question = f"{name} needs to {base} {job} {unit}"
    steps = []
    left = job
    if done:
        question += f" and has already done {done} of them"
        t1, left = _calc("-", job, done)
        steps.append(f"There are {t1} {unit} left.")
    question += (
        f". {name} {verb} {rate} {unit} per hour and works {hours} hours each day. "
        f"How many more days will it take?"
    )
    t2, per_day = _calc("*", rate, hours)
    t3, need = _calc("/", left, per_day)
    steps += [f"Each day {name} does {t2} {unit}.", f"It will take {t3} days."]
    return question, steps, need


def _t_chain(rng: random.Random) -> _Problem:
    """1-4 successive changes to a quantity; covers the single-step case."""
    name = rng.choice(_NAMES)
    other = rng.choice([n for n in _NAMES if n != name])
    item = rng.choice(_SHARE_ITEMS)
    value = rng.randint(5, 60)
    question = f"{name} has {value} {item}."
    steps: list[str] = []
    for _ in range(rng.randint(1, 4)):
        kinds = ["add", "mul"]
        if value > 2:
            kinds.append("sub")
        divisors = [d for d in (2, 3, 4, 5) if value % d == 0 and value // d > 0]
        if divisors:
            kinds.append("div")
        kind = rng.choice(kinds)
        if kind == "add":
            x = rng.randint(2, 40)
            question += f" {other} gives {name} {x} more."
            text, value = _calc("+", value, x)
            steps.append(f"After receiving more, {name} has {text} {item}.")
        elif kind == "sub":
            x = rng.randint(1, value - 1)
            question += f" {name} gives away {x} of them."
            text, value = _calc("-", value, x)
            steps.append(f"After giving some away, {name} has {text} {item}.")
        elif kind == "mul":
            x = rng.randint(2, 4) if value < 200 else 2
            question += f" Then {name} {_SCALE_VERBS[x]} the collection."
            text, value = _calc("*", value, x)
            steps.append(f"Multiplying gives {text} {item}.")
        else:
            x = rng.choice(divisors)
            question += f" {name} splits them into {x} equal piles and keeps only one pile."
            text, value = _calc("/", value, x)
            steps.append(f"One pile holds {text} {item}.")
    question += f" How many {item} does {name} have now?"
    return question, steps, value


def _t_discount(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    item = rng.choice(_SALE_ITEMS)
    pct = rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 60, 75))
    step = _multiple_for_percent(pct)
    price = step * rng.randint(max(1, 20 // step), max(2, 800 // step))
    t1, off = _percent_of(price, pct)
    t2, sale = _calc("-", price, off)
    steps = [f"The discount is {t1} dollars.", f"The sale price is {t2} dollars."]
    question = f"A {item} normally costs ${price}. It is on sale for {pct}% off."
    if rng.random() < 0.4:
        qty = rng.randint(2, 5)
        t3, total = _calc("*", sale, qty)
        steps.append(f"For {qty} of them {name} pays {t3} dollars.")
        question += f" How much does {name} pay for {qty} of them at the sale price?"
        return question, steps, total
    question += f" How much does {name} pay for it?"
    return question, steps, sale


def _t_group_percent(rng: random.Random) -> _Problem:
    place, whole, part_a, part_b = rng.choice(_GROUP_SPLITS)
    pct = rng.choice((10, 20, 25, 30, 40, 45, 50, 60, 64, 75, 80))
    step = _multiple_for_percent(pct)
    total = step * rng.randint(max(1, 40 // step), max(2, 1200 // step))
    t1, a = _percent_of(total, pct)
    t2, b = _calc("-", total, a)
    question = (
        f"There are {total} {whole} at the {place}. {pct}% of them are {part_a} and the rest "
        f"are {part_b}. How many {part_b} are there?"
    )
    return question, [f"There are {t1} {part_a}.", f"So there are {t2} {part_b}."], b


def _t_ages(rng: random.Random) -> _Problem:
    a, b, c = _pick_names(rng, 3)
    c_age = rng.randint(2, 15)
    mult = rng.randint(2, 4)
    diff = rng.randint(1, 12)
    t1, b_age = _calc("*", c_age, mult)
    t2, a_age = _calc("+", b_age, diff)
    question = (
        f"{b} is {_PLURAL_WORDS[mult]} as old as {c}, and {a} is {diff} years older than {b}. "
        f"If {c} is {c_age} years old,"
    )
    steps = [f"{b} is {t1} years old.", f"{a} is {t2} years old."]
    if rng.random() < 0.5:
        years = rng.randint(2, 20)
        t3, future = _calc("+", a_age, years)
        steps.append(f"In {years} years {a} will be {t3} years old.")
        question += f" how old will {a} be in {years} years?"
        return question, steps, future
    t3, total = _calc("+", a_age, b_age, c_age)
    steps.append(f"Together they are {t3} years old.")
    question += " what is the sum of their ages?"
    return question, steps, total


def _t_wages(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    job = rng.choice(_JOBS)
    wage = rng.randint(8, 30)
    hours = rng.randint(2, 8)
    days = rng.randint(2, 6)
    t1, per_day = _calc("*", wage, hours)
    t2, earned = _calc("*", per_day, days)
    spent = rng.randint(1, earned - 1)
    t3, saved = _calc("-", earned, spent)
    question = (
        f"{name} works as a {job} and earns ${wage} an hour. This week {name} worked {hours} "
        f"hours a day for {days} days and then spent ${spent}. How much money does {name} "
        f"have left?"
    )
    steps = [
        f"{name} earns {t1} dollars a day.",
        f"Over {days} days that is {t2} dollars.",
        f"After spending, {name} has {t3} dollars left.",
    ]
    return question, steps, saved


def _t_fractions(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    place, whole, part_a, part_b = rng.choice(_GROUP_SPLITS)
    q = rng.randint(2, 5)
    r = rng.randint(2, 4)
    # total must be divisible by q, and the remainder after removing 1/q by r.
    unit = q * r
    total = unit * rng.randint(2, 30)
    t1, first = _calc("/", total, q)
    t2, rest = _calc("-", total, first)
    t3, second = _calc("/", rest, r)
    t4, others = _calc("-", rest, second)
    frac = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}
    question = (
        f"{name} counts {total} {whole} at the {place}. {frac[q].capitalize()} of them are "
        f"{part_a}. Of the remaining {whole}, {frac[r]} are {part_b}. How many of the {whole} "
        f"are neither {part_a} nor {part_b}?"
    )
    steps = [
        f"There are {t1} {part_a}.",
        f"That leaves {t2} {whole}.",
        f"Of those, {t3} are {part_b}.",
        f"So {t4} are neither.",
    ]
    return question, steps, others


def _t_distance(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    vehicle = rng.choice(_VEHICLES)
    s1, h1 = rng.randint(20, 80), rng.randint(1, 5)
    if rng.random() < 0.5:
        s2, h2 = rng.randint(20, 80), rng.randint(1, 5)
        t1, d1 = _calc("*", s1, h1)
        t2, d2 = _calc("*", s2, h2)
        t3, total = _calc("+", d1, d2)
        question = (
            f"{name} drives a {vehicle} at {s1} miles per hour for {h1} hours, then at {s2} miles "
            f"per hour for {h2} hours. How many miles does {name} travel in total?"
        )
        steps = [
            f"The first part is {t1} miles.",
            f"The second part is {t2} miles.",
            f"In total {name} travels {t3} miles.",
        ]
        return question, steps, total
    distance = s1 * h1
    question = (
        f"A {vehicle} travels {distance} miles at a steady {s1} miles per hour. "
        f"How many hours does the trip take?"
    )
    t1, hours = _calc("/", distance, s1)
    return question, [f"The trip takes {t1} hours."], hours


def _t_recipe(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    food, ingredient = rng.choice(_RECIPES)
    per_batch = rng.randint(6, 24)
    need = rng.randint(2, 6)
    batches = rng.randint(2, 9)
    wanted = per_batch * batches
    t1, b = _calc("/", wanted, per_batch)
    t2, amount = _calc("*", b, need)
    question = (
        f"One batch of {food} makes {per_batch} {food} and uses {need} {ingredient}. "
        f"{name} wants to make {wanted} {food}. How many {ingredient} does {name} need?"
    )
    steps = [f"{name} needs to make {t1} batches.", f"That takes {t2} {ingredient}."]
    return question, steps, amount


def _t_savings(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    item = rng.choice(_SALE_ITEMS)
    weekly = rng.randint(5, 40)
    weeks = rng.randint(2, 20)
    saved = rng.randint(0, 15) * 5
    price = saved + weekly * weeks
    question = f"{name} wants a {item} that costs ${price}."
    steps = []
    left = price
    if saved:
        question += f" {name} has already saved ${saved}."
        t1, left = _calc("-", price, saved)
        steps.append(f"{name} still needs {t1} dollars.")
    question += (
        f" {name} saves ${weekly} every week. How many weeks will it take to have enough money?"
    )
    t2, n = _calc("/", left, weekly)
    steps.append(f"It will take {t2} weeks.")
    return question, steps, n


def _t_comparison(rng: random.Random) -> _Problem:
    a, b, c = _pick_names(rng, 3)
    item = rng.choice(_SHARE_ITEMS)
    base = rng.randint(3, 40)
    mult = rng.randint(2, 5)
    fewer = rng.randint(1, base * mult - 1)
    t1, b_has = _calc("*", base, mult)
    t2, c_has = _calc("-", b_has, fewer)
    t3, total = _calc("+", base, b_has, c_has)
    question = (
        f"{a} has {base} {item}. {b} has {_PLURAL_WORDS[mult]} as many {item} as {a}, and {c} "
        f"has {fewer} fewer {item} than {b}. How many {item} do they have altogether?"
    )
    steps = [f"{b} has {t1} {item}.", f"{c} has {t2} {item}.", f"Altogether: {t3} {item}."]
    return question, steps, total


_TEMPLATES: tuple[Callable[[random.Random], _Problem], ...] = (
    _t_shopping,
    _t_sharing,
    _t_rate_time,
    _t_chain,
    _t_discount,
    _t_group_percent,
    _t_ages,
    _t_wages,
    _t_fractions,
    _t_distance,
    _t_recipe,
    _t_savings,
    _t_comparison,
)


def arithmetic(num_problems: int = 20000, seed: int = 0) -> Iterator[dict[str, str]]:
    """Seeded GSM8K-style word problems: ``{"question": ..., "answer": ...}``.

    The answer holds one worked step per line with ``<<expr=value>>`` calculator annotations
    (integers and ``+ - * /`` only, every value a whole number) and ends with ``#### N``, where
    N is the value of the last annotation.
    """
    if num_problems < 0:
        raise ValueError(f"num_problems must be >= 0, got {num_problems}")
    rng = random.Random(seed)
    for _ in range(num_problems):
        template = rng.choice(_TEMPLATES)
        question, steps, final = template(rng)
        answer = "\n".join([*steps, f"#### {final}"])
        yield {"question": question, "answer": answer}
