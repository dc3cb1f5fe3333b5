"""The study's report: the SFT runs' own last logged values, per branch and target at the best
LR, with Welch p-values vs the baseline and the proximity advantage; results.csv, summary.csv,
results.md and one TensorBoard HParams session per SFT run (``<output>/hparams``)."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from midtrain.checkpoint.layout import CONFIG
from midtrain.errors import MidtrainError
from midtrain.study.plan import Stage, Study, realized_mixture
from midtrain.study.stats import welch_t_test

EVAL_PREFIX = "eval/"  # downstream evaluations logged by SFT runs (eval/<task>/<metric>)


def hparams_dir(output: str | Path) -> Path:
    """Where the HParams sessions go: ``tensorboard --logdir <output>/hparams``."""
    return Path(output) / "hparams"


def last_scalars(run_dir: Path) -> dict[str, float]:
    """The last value of every TensorBoard scalar in a run directory (its own events only)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: float(ea.Scalars(tag)[-1].value) for tag in ea.Tags()["scalars"]}


def last_scalar(run_dir: Path, tag: str) -> float:
    """The last value of one scalar; a one-line error when it was never logged."""
    scalars = last_scalars(run_dir)
    if tag not in scalars:
        raise MidtrainError(f"{run_dir}: no {tag!r} was logged; does the SFT config validate?")
    return scalars[tag]


def collect(stages: list[Stage], general: str) -> list[dict[str, Any]]:
    """One row per SFT run: in-domain and general (``val/<general>/loss``) validation loss, and
    every ``eval/*`` scalar the run logged (downstream evaluations), all last values."""
    rows = []
    for s in stages:
        if s.kind != "sft":
            continue
        m = s.meta
        scalars = last_scalars(s.directory)
        row: dict[str, Any] = {
            "branch": m["branch"],
            "target": m["target"],
            "lr": m["lr"],
            "seed": m["seed"],
        }
        for key, tag in (
            ("in_domain_loss", f"val/{m['domain']}/loss"),
            ("general_loss", f"val/{general}/loss"),
        ):
            if tag not in scalars:
                raise MidtrainError(
                    f"{s.directory}: no {tag!r} was logged; does the SFT config validate?"
                )
            row[key] = scalars[tag]
        row.update(
            sorted(
                (t, v)
                for t, v in scalars.items()  # a NaN is no number: left blank
                if t.startswith(EVAL_PREFIX) and math.isfinite(v)
            )
        )
        row["run"] = str(s.directory)
        rows.append(row)
    return rows


def eval_tags(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in rows for k in r if k.startswith(EVAL_PREFIX)})


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


# summary.csv's columns, in this order, always (blank where a value does not apply), then
# `<eval tag>_mean`, `<eval tag>_std` per downstream evaluation; documented in docs/study.md
SUMMARY_COLUMNS = [
    "target",
    "branch",
    "grid",
    "start_step",
    "weight",
    "ramp_steps",
    "ramp",
    "best_lr",
    "seeds",
    "in_domain_mean",
    "in_domain_std",
    "forgetting_mean",
    "forgetting_std",
    "in_domain_rel_improvement",
    "forgetting_rel_improvement",
    "in_domain_p",
    "forgetting_p",
    "proximity_advantage",
]


def branch_columns(branch: Mapping[str, Any] | None) -> dict[str, Any]:
    """Where a branch sits in its grid: grid name, start step, weight of its domain, ramp
    length and shape (a one-switch branch: its step and its domain's weight; baseline: blank)."""
    if not branch or branch.get("step") is None:
        return {}
    return {
        "grid": branch.get("grid", ""),
        "start_step": branch["step"],
        "weight": branch.get("weight", branch["weights"][branch["domain"]]),
        "ramp_steps": branch.get("ramp_steps", 0),
        "ramp": branch.get("ramp", "") if branch.get("ramp_steps") else "",
    }


def summarize(
    rows: list[dict[str, Any]],
    advantage: Mapping[tuple[str, str], float] | None = None,
    branches: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Per branch and target, at the LR with the best mean in-domain loss; with ``branches``
    (``expand_branches``), each row also says where its branch sits in its grid."""
    out = []
    keys = sorted(
        {(r["branch"], r["target"]) for r in rows}, key=lambda k: (k[1], k[0] != "baseline", k[0])
    )
    best: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for key in keys:
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for r in rows:
            if (r["branch"], r["target"]) == key:
                by_lr.setdefault(r["lr"], []).append(r)
        lr = min(by_lr, key=lambda v: np.mean([r["in_domain_loss"] for r in by_lr[v]]))
        best[key] = by_lr[lr]
    tags = eval_tags(rows)
    for branch, target in keys:
        runs = best[(branch, target)]
        base = best.get(("baseline", target))
        ind = [r["in_domain_loss"] for r in runs]
        gen = [r["general_loss"] for r in runs]
        row: dict[str, Any] = {
            "target": target,
            "branch": branch,
            **branch_columns((branches or {}).get(branch)),
            "best_lr": runs[0]["lr"],
            "seeds": len(runs),
        }
        row["in_domain_mean"], row["in_domain_std"] = _mean_std(ind)
        row["forgetting_mean"], row["forgetting_std"] = _mean_std(gen)
        if base is not None and branch != "baseline":
            b_ind = [r["in_domain_loss"] for r in base]
            b_gen = [r["general_loss"] for r in base]
            row["in_domain_rel_improvement"] = (np.mean(b_ind) - row["in_domain_mean"]) / np.mean(
                b_ind
            )
            row["forgetting_rel_improvement"] = (np.mean(b_gen) - row["forgetting_mean"]) / np.mean(
                b_gen
            )
            row["in_domain_p"] = welch_t_test(ind, b_ind)
            row["forgetting_p"] = welch_t_test(gen, b_gen)
        if advantage is not None and (branch, target) in advantage:
            row["proximity_advantage"] = advantage[(branch, target)]
        for tag in tags:
            values = [r[tag] for r in runs if tag in r]
            if values:
                row[f"{tag}_mean"], row[f"{tag}_std"] = _mean_std(values)
        out.append(row)
    return out


def proximity(study: Study, targets: Mapping[str, np.ndarray]) -> dict[tuple[str, str], float]:
    """Proximity advantage of every branch for every SFT target (token counts in ``targets``):
    dist(P, T) − dist(M, T) (``similarity.proximity_advantage``), where P is the baseline's
    pretraining mixture and M the branch's mixture after its switch, both as realized in every
    global batch (the plan's shares), each domain sampled from the pretraining store. The
    baseline's M is P: 0 by construction."""
    from midtrain.data.store import Store
    from midtrain.study.similarity import proximity_advantage, token_counts

    plans = study.mixture_rows()
    pretraining = realized_mixture(plans["baseline"], 0)
    mixes = {
        name: realized_mixture(rows, max(r["phase"] for r in rows)) for name, rows in plans.items()
    }
    store = Store(study.settings.store)
    n, k = study.cfg.similarity_docs, study.cfg.similarity_top_k
    domains = sorted({d for m in [pretraining, *mixes.values()] for d in m})
    counts = {d: token_counts(store, d, n) for d in domains}
    return {
        (branch, target): proximity_advantage(counts, pretraining, mix, t, k)
        for branch, mix in mixes.items()
        for target, t in targets.items()
    }


def sft_target_counts(study: Study) -> dict[str, np.ndarray]:
    """Token counts of every SFT target, from the store its (first) SFT run resolved."""
    from midtrain.data.store import Store
    from midtrain.study.similarity import token_counts

    out: dict[str, np.ndarray] = {}
    for s in study.stages:
        if s.kind == "sft" and s.meta["target"] not in out:
            data = yaml.safe_load((s.directory / CONFIG).read_text())["data"]["init_args"]
            out[s.meta["target"]] = token_counts(
                Store(data["store"]), data["target"], study.cfg.similarity_docs
            )
    return out


def write_report(
    output: str | Path,
    general: str,
    rows: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    figures: Sequence[str] = (),
) -> str:
    """results.csv, summary.csv, results.md (linking ``figures``, PNG names in ``output``) and
    the HParams sessions; returns the markdown table."""
    root = Path(output)
    with (root / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    with (root / "summary.csv").open("w", newline="") as f:
        columns = SUMMARY_COLUMNS + [k for r in summary for k in r if k not in SUMMARY_COLUMNS]
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(columns)), restval="")
        w.writeheader()
        w.writerows(summary)

    def pm(mean: float, std: float) -> str:
        return f"{mean:.4f} ± {std:.4f}"

    def opt(r: dict[str, Any], key: str, fmt: str) -> str:
        return (
            format(r[key], fmt)
            if key in r and not (isinstance(r[key], float) and math.isnan(r[key]))
            else "–"
        )

    tags = eval_tags(rows)
    lines = [
        f"# Results: {root.name}",
        "",
        f"In-domain: validation loss on the SFT target. Forgetting: validation loss on "
        f"`{general}` after SFT (lower is better for both). Mean ± std over seeds at "
        f"the best LR (by in-domain loss); Δ = relative improvement vs baseline "
        f"((baseline − x) / baseline); p = Welch t-test vs baseline; proximity adv. = "
        f"dist(pretraining mixture, target) − dist(branch mixture, target)."
        + (
            " `eval/…`: downstream evaluations logged by the SFT runs (last value)." if tags else ""
        ),
        "",
        "| target | branch | best LR | in-domain | Δ | p | forgetting | Δ | p | "
        "proximity adv. |" + "".join(f" {t} |" for t in tags),
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(tags),
    ]
    for r in summary:
        evals = "".join(
            f" {pm(r[t + '_mean'], r[t + '_std'])} |" if t + "_mean" in r else " – |" for t in tags
        )
        lines.append(
            f"| {r['target']} | {r['branch']} | {r['best_lr']:g} | "
            f"{pm(r['in_domain_mean'], r['in_domain_std'])} | "
            f"{opt(r, 'in_domain_rel_improvement', '+.2%')} | {opt(r, 'in_domain_p', '.3g')} | "
            f"{pm(r['forgetting_mean'], r['forgetting_std'])} | "
            f"{opt(r, 'forgetting_rel_improvement', '+.2%')} | {opt(r, 'forgetting_p', '.3g')} | "
            f"{opt(r, 'proximity_advantage', '+.4f')} |" + evals
        )
    table = "\n".join(lines)
    links = [f"![{Path(f).stem}]({f})" for f in figures]
    (root / "results.md").write_text(table + "\n" + "".join(f"\n{x}\n" for x in links))
    write_hparams(root, rows)
    return table


def write_hparams(output: Path, rows: list[dict[str, Any]]) -> None:
    """One TensorBoard HParams session per SFT run, so the table is browsable."""
    from torch.utils.tensorboard import SummaryWriter

    for r in rows:
        name = f"{r['branch']}/{r['target']}/lr{r['lr']:g}-seed{r['seed']}"
        metrics = {
            "hparam/in_domain_loss": r["in_domain_loss"],
            "hparam/forgetting_loss": r["general_loss"],
        }
        metrics.update({f"hparam/{k}": v for k, v in r.items() if k.startswith(EVAL_PREFIX)})
        w = SummaryWriter(str(hparams_dir(output) / name))
        w.add_hparams(
            {"branch": r["branch"], "target": r["target"], "lr": r["lr"], "seed": r["seed"]},
            metrics,
            run_name=".",
        )
        w.close()
