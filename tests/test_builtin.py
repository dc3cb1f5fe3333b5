"""Tests for the offline built-in record sources."""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import os
import re
import sysconfig
from fractions import Fraction
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from midtrain.data import builtin
from midtrain.data.builtin import (
    BUILTIN_SOURCES,
    arithmetic,
    builtin_records,
    python_docs,
    python_stdlib,
)

# Annotation as rendered in the answer: "expr = <<expr=value>>value".
_STEP_RE = re.compile(r"(\S+) = <<([^<>=]+)=(-?\d+)>>(-?\d+)")
_ANNOTATION_RE = re.compile(r"<<([^<>=]+)=(-?\d+)>>")
_EXPR_CHARS_RE = re.compile(r"^[0-9+\-*/]+$")


@pytest.fixture(scope="module")
def all_docs() -> list[dict[str, str]]:
    # python_docs parses the whole stdlib (~1.5 s), so do it once for the module.
    return list(python_docs())


@pytest.fixture(scope="module")
def all_stdlib() -> list[dict[str, str]]:
    return list(python_stdlib())


@pytest.fixture(scope="module")
def problems() -> list[dict[str, str]]:
    return list(arithmetic(5000, seed=0))


def _exact_eval(expr: str) -> Fraction:
    """Evaluate an integer +-*/ expression exactly, independently of the generator's code."""
    assert _EXPR_CHARS_RE.match(expr), f"unexpected characters in {expr!r}"

    def ev(node: ast.expr) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if isinstance(node.op, ast.Div):
                return left / right
        raise AssertionError(f"unsupported node in {expr!r}: {ast.dump(node)}")

    value = ev(ast.parse(expr, mode="eval").body)
    # Cross-check against Python's own evaluation, as a GSM8K calculator would do it.
    assert eval(expr, {"__builtins__": {}}) == value  # noqa: S307 - charset checked above
    return value


def _first(records: object, n: int) -> list[dict[str, str]]:
    return list(itertools.islice(records, n))  # type: ignore[call-overload]


# --- registry ------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert set(BUILTIN_SOURCES) == {"python-docs", "python-stdlib", "arithmetic"}


def test_unknown_name_raises_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="unknown builtin source 'nope'") as info:
        builtin_records("nope")
    assert "arithmetic" in str(info.value)  # lists the known names


def test_builtin_records_forwards_kwargs() -> None:
    got = list(builtin_records("arithmetic", num_problems=7, seed=3))
    assert got == list(arithmetic(7, seed=3))
    assert len(list(builtin_records("python-stdlib", max_docs=3))) == 3


# --- determinism ---------------------------------------------------------------------------


def test_python_docs_deterministic(all_docs: list[dict[str, str]]) -> None:
    assert _first(python_docs(), 200) == all_docs[:200]  # served by the docstring cache
    # Re-parse from scratch too, so determinism does not rest on the cache alone.
    builtin._file_docstrings.cache_clear()
    assert _first(python_docs(), 200) == all_docs[:200]


def test_python_stdlib_deterministic(all_stdlib: list[dict[str, str]]) -> None:
    assert _first(python_stdlib(), 200) == all_stdlib[:200]


def test_arithmetic_deterministic_and_seeded(problems: list[dict[str, str]]) -> None:
    assert list(arithmetic(200, seed=0)) == problems[:200]
    other = list(arithmetic(200, seed=1))
    assert other != problems[:200]
    # Not merely shifted/reordered: most questions differ between seeds.
    assert len({r["question"] for r in other} & {r["question"] for r in problems[:200]}) < 20


# --- record shape --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "fields"),
    [
        ("all_docs", {"text"}),
        ("all_stdlib", {"text", "path"}),
        ("problems", {"question", "answer"}),
    ],
)
def test_records_are_nonempty_str_dicts(
    fixture: str, fields: set[str], request: pytest.FixtureRequest
) -> None:
    records: list[dict[str, str]] = request.getfixturevalue(fixture)
    assert records
    for record in records:
        assert set(record) == fields
        for value in record.values():
            assert isinstance(value, str) and value.strip()
    json.dumps(records[:50])  # must be JSON-serialisable for datasets.from_generator


# --- max_docs ------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [python_docs, python_stdlib])
def test_max_docs_respected(factory: object) -> None:
    assert len(list(factory(max_docs=5))) == 5  # type: ignore[operator]
    assert list(factory(max_docs=0)) == []  # type: ignore[operator]
    with pytest.raises(ValueError, match="max_docs"):
        list(factory(max_docs=-1))  # type: ignore[operator]


def test_num_problems_respected() -> None:
    assert len(list(arithmetic(13))) == 13
    assert list(arithmetic(0)) == []


# --- python_docs ---------------------------------------------------------------------------


def test_python_docs_content(all_docs: list[dict[str, str]]) -> None:
    assert len(all_docs) > 100
    texts = [r["text"] for r in all_docs]
    # Topics come first, in key order, verbatim.
    keys = [k for k in sorted(topics) if topics[k].strip()]
    assert texts[: len(keys)] == [topics[k] for k in keys]
    assert any('The "if" statement' in t for t in texts)
    # Then module docstrings, all long enough; the os module's docstring is a known one.
    module_docs = texts[len(keys) :]
    assert module_docs and all(len(t) >= 200 for t in module_docs)
    assert os.__doc__ is not None and inspect.cleandoc(os.__doc__) in module_docs
    assert sum(map(len, texts)) > 300_000


def test_python_docs_api_docstrings_adds_prose(all_docs: list[dict[str, str]]) -> None:
    extended = _first(python_docs(include_api_docstrings=True), 120)
    # Topics are identical; module documents only grow.
    n_topics = sum(1 for text in topics.values() if text.strip())
    assert extended[:n_topics] == all_docs[:n_topics]
    assert sum(len(r["text"]) for r in extended) > sum(len(r["text"]) for r in all_docs[:120])


# --- python_stdlib -------------------------------------------------------------------------


def test_python_stdlib_matches_files(all_stdlib: list[dict[str, str]]) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [r["path"] for r in all_stdlib]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert len(all_stdlib) > 300
    for record in all_stdlib[:: max(1, len(all_stdlib) // 7)]:
        assert record["text"] == (root / record["path"]).read_bytes().decode("utf-8")
    by_path = {r["path"]: r["text"] for r in all_stdlib}
    assert "def" in by_path["json/decoder.py"]
    for path in paths:
        parts = path.split("/")
        assert not {"test", "tests", "idlelib", "lib2to3", "site-packages"} & set(parts)
        assert path.endswith(".py") and "__pycache__" not in parts
    assert all(len(r["text"].encode()) <= 200_000 for r in all_stdlib)


# --- arithmetic ----------------------------------------------------------------------------


def test_arithmetic_annotations_verify(problems: list[dict[str, str]]) -> None:
    step_counts: set[int] = set()
    for record in problems:
        lines = record["answer"].split("\n")
        final = re.fullmatch(r"#### (\d+)", lines[-1])
        assert final, record["answer"]
        annotations = _ANNOTATION_RE.findall(record["answer"])
        assert annotations and record["answer"].count("<<") == len(annotations)
        for expr, value in annotations:
            assert _exact_eval(expr) == int(value), (expr, value)
            assert int(value) >= 0
        # The rendered text around each annotation agrees with it.
        for shown, expr, value, after in _STEP_RE.findall(record["answer"]):
            assert shown == expr and after == value
        assert all("<<" in line for line in lines[:-1])  # one worked step per line
        assert int(annotations[-1][1]) == int(final.group(1))
        step_counts.add(len(annotations))
    assert step_counts >= {1, 2, 3, 4}


def test_arithmetic_variety(problems: list[dict[str, str]]) -> None:
    questions = [r["question"] for r in problems]
    assert len(set(questions)) > 0.95 * len(questions)
    # Distinct templates show up through their characteristic phrasing.
    markers = [
        "cost $",
        "equally among",
        "per hour",
        "gives away",
        "% off",
        "% of them",
        "years old",
        "an hour",
        "Of the remaining",
        "miles",
        "One batch",
        "every week",
        "as many",
    ]
    for marker in markers:
        assert any(marker in q for q in questions), marker
