"""How far to trust the mixture advisor (``midtrain advise --check <study output>``): the
advisor's predictions for the branches of a finished ``midtrain experiment``, from the configs
its stages saved, against what the study measured after SFT (its ``summary.csv``): Spearman's
rho and Kendall's tau-b per target, measure and predictor, with the number of pairs; and a
figure of predicted vs measured when matplotlib is installed."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from midtrain.checkpoint.layout import CONFIG
from midtrain.data.store import Store
from midtrain.errors import MidtrainError
from midtrain.study.advisor import (
    Advice,
    Candidate,
    check_settings,
    predict,
    target_documents,
)
from midtrain.study.config import FitSettings, pretraining_weights
from midtrain.study.plan import stage_dir
from midtrain.study.proxy import (
    ANNEALS,
    PROXY_PREDICTORS,
    PretrainRun,
    Proxy,
    Scorer,
    check_length,
    measure_proxies,
    plan_stages,
    run_stages,
    start_checkpoint,
    with_controls,
)
from midtrain.study.stats import kendall, spearman

# measure -> the summary column it is read from (relative improvement vs baseline: higher is
# better for both, so a trustworthy predictor correlates positively)
MEASURES = {"in_domain": "in_domain_rel_improvement", "forgetting": "forgetting_rel_improvement"}


@dataclass(frozen=True)
class CalibrationRow:
    """Agreement of one predictor with one measured outcome over one target's branches."""

    target: str
    measure: str  # in_domain | forgetting
    predictor: str
    n: int  # branches (the baseline included: predicted 0, measured 0)
    pairs: int  # n (n - 1) / 2 branch pairs the rank correlations compare
    spearman: float
    kendall: float


@dataclass(frozen=True)
class Calibration:
    """The advisor's predictions for a study's branches, what the study measured, and their
    agreement."""

    study: str
    advice: Advice
    measured: dict[tuple[str, str], dict[str, float]]  # (target, branch) -> measure -> value
    rows: list[CalibrationRow]


def read_summary(study: Path) -> list[dict[str, str]]:
    summary = study / "summary.csv"
    if not study.is_dir():
        raise MidtrainError(f"advise --check: {study} is not a directory")
    if not summary.is_file():
        raise MidtrainError(
            f"advise --check: {study} has no finished study (no summary.csv); run "
            "`midtrain experiment --config <study.yaml>` to the end first"
        )
    with summary.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"target", "branch", *MEASURES.values()} <= set(rows[0]):
        raise MidtrainError(f"advise --check: {summary} is not a finished study's summary")
    return rows


def _config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MidtrainError(f"advise --check: {path} is missing; is this a study's output?")
    return yaml.safe_load(path.read_text())


def _find(path: str, study: Path, where: Path) -> str:
    """A path a stage's config names, relative to the directory the study ran in: tried from
    here, then from each directory above the study's output."""
    for base in [Path.cwd(), *study.resolve().parents]:
        if (base / path).exists():
            return str(base / path)
    raise MidtrainError(
        f"advise --check: {path} (named in {where}) not found; run from the directory the "
        "study ran in"
    )


def _switch(config: dict[str, Any], max_steps: int) -> tuple[int, dict[str, float], int, str]:
    """A branch's switch: its step, weights, ramp length and shape."""
    for cb in (config.get("trainer") or {}).get("callbacks") or []:
        if str(cb.get("class_path", "")).endswith("MixtureSwitch"):
            a = cb.get("init_args") or {}
            step = a["step"] if a.get("step") is not None else round(a["fraction"] * max_steps)
            weights = {str(k): float(v) for k, v in a["weights"].items()}
            return int(step), weights, int(a.get("ramp_steps") or 0), str(a.get("ramp") or "linear")
    raise MidtrainError("advise --check: a branch's config has no MixtureSwitch")


def study_inputs(
    study: Path, rows: list[dict[str, str]]
) -> tuple[Store, dict[str, float], int, list[Candidate], dict[str, dict[str, str]]]:
    """What the advisor needs, from the configs the study's stages saved: the store, the
    pretraining mixture, max_steps, the branches and the SFT targets."""
    base_cfg_path = stage_dir(study, "baseline") / CONFIG
    settings = FitSettings.of(_config(base_cfg_path))
    settings.store = _find(settings.store, study, base_cfg_path)
    pre = pretraining_weights(settings)
    candidates = [Candidate("baseline")]
    for branch in dict.fromkeys(r["branch"] for r in rows):
        if branch != "baseline":
            step, weights, _, _ = _switch(
                _config(stage_dir(study, branch) / CONFIG), settings.max_steps
            )
            gain = {d: w / sum(weights.values()) - pre.get(d, 0.0) for d, w in weights.items()}
            candidates.append(Candidate(branch, max(gain, key=lambda d: gain[d]), step, weights))
    targets = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        runs = sorted((study / "sft" / "baseline" / target).glob(f"*/{CONFIG}"))
        if not runs:
            raise MidtrainError(f"advise --check: no SFT run of target {target!r} in {study}")
        data = _config(runs[0])["data"]["init_args"]
        targets[target] = {"store": _find(data["store"], study, runs[0]), "target": data["target"]}
    return Store(settings.store), pre, settings.max_steps, candidates, targets


def _value(row: dict[str, str], column: str) -> float:
    v = row.get(column, "")
    return 0.0 if row["branch"] == "baseline" else (float(v) if v not in ("", None) else math.nan)


def agreement(
    advice: Advice, measured: dict[tuple[str, str], dict[str, float]]
) -> list[CalibrationRow]:
    out = []
    for target in dict.fromkeys(p.target for p in advice.predictions):
        preds = [p for p in advice.predictions if p.target == target]
        for measure in MEASURES:
            y = np.array([measured[(target, p.candidate.name)][measure] for p in preds])
            ok = np.isfinite(y)
            n = int(ok.sum())
            for predictor in preds[0].features:  # the token statistics, then any proxy's
                x = np.array([p.features[predictor] for p in preds])[ok]
                out.append(
                    CalibrationRow(
                        target,
                        measure,
                        predictor,
                        n,
                        n * (n - 1) // 2,
                        spearman(x, y[ok]),
                        kendall(x, y[ok]),
                    )
                )
    return out


def calibrate(
    study: str,
    rank_by: str = "proximity_seen",
    num_docs: int = 200,
    top_k: int = 1000,
    min_tokens: int = 1000,
    bootstrap: int = 200,
    seed: int = 0,
    proxy_steps: int = 0,
    proxy_out: str | None = None,
    proxy_schedule: str = "anneal",
) -> Calibration:
    """The advisor's predictions for a finished study's branches against its measurements.

    With ``proxy_steps`` N > 0, also the measured predictors (``study.proxy``): an N-step
    proxy of every branch from its own start checkpoint with its mixture, and a control per
    start step, each scored with the target's SFT config; run (resumably) under ``proxy_out``
    (default ``<study>/advise``)."""
    root = Path(study)
    rows = read_summary(root)
    store, pre, max_steps, candidates, target_specs = study_inputs(root, rows)
    check_settings(rank_by, num_docs, top_k, bootstrap, max_steps)
    docs = {
        t: target_documents(t, spec, store, num_docs, seed, min_tokens)
        for t, spec in target_specs.items()
    }
    advice = predict(
        store, pre, candidates, docs, max_steps, rank_by, num_docs, top_k, bootstrap, seed
    )
    if proxy_steps:
        out = Path(proxy_out) if proxy_out else root / "advise"
        add_proxy_features(root, advice, candidates, proxy_steps, proxy_schedule, out)
    measured = {
        (r["target"], r["branch"]): {m: _value(r, c) for m, c in MEASURES.items()} for r in rows
    }
    return Calibration(str(root), advice, measured, agreement(advice, measured))


def study_proxies(
    study: Path, candidates: list[Candidate], run: PretrainRun, steps: int
) -> list[Proxy]:
    """Every branch as a proxy from the baseline's checkpoint at its start step, with its
    switch (weights and ramp), and a control per start step; the length checked first."""
    out = []
    for c in candidates:
        if c.start is None:
            continue
        cfg = _config(stage_dir(study, c.name) / CONFIG)
        step, weights, ramp_steps, ramp = _switch(cfg, run.settings.max_steps)
        out.append(Proxy(c.name, step, Path(), weights, ramp_steps, ramp, c.domain))
    check_length(out, steps, run.settings.max_steps, "--proxy_steps")
    out = [replace(p, checkpoint=start_checkpoint(run, p.start, f"branch {p.name}")) for p in out]
    return with_controls(out)


def study_scorers(study: Path, targets: list[str]) -> list[Scorer]:
    """Per target, validate with the config its first SFT run saved (its store, target and
    general set)."""
    out = []
    for target in targets:
        config = sorted((study / "sft" / "baseline" / target).glob(f"*/{CONFIG}"))[0]
        data = _config(config)["data"]["init_args"]
        general = (data.get("general_val_sets") or [None])[0]
        if general is None:
            raise MidtrainError(f"advise --check: {config} validates no general set")
        args = ["--config", str(config), "--trainer.logger=true"]
        out.append(Scorer(target, str(data["target"]), str(general), args))
    return out


def add_proxy_features(
    study: Path,
    advice: Advice,
    candidates: list[Candidate],
    steps: int,
    schedule: str,
    out: Path,
) -> None:
    """Run (or reuse) the study's proxies and add their predictors to every prediction."""
    run = PretrainRun.of(stage_dir(study, "baseline"), "advise --check")
    if schedule not in ANNEALS:
        raise MidtrainError(f"--proxy_schedule: {schedule!r} is not one of {', '.join(ANNEALS)}")
    proxies = study_proxies(study, candidates, run, steps)
    scorers = study_scorers(study, list(dict.fromkeys(p.target for p in advice.predictions)))
    root = out / "proxies" / f"steps{steps}"
    stages = plan_stages(run, proxies, scorers, steps, schedule, root)
    run_stages(stages, rerun_changed=False, say=print)
    measured = measure_proxies(proxies, scorers, stages, steps, run.settings.max_steps)
    for p in advice.predictions:
        if p.candidate.start is None:
            p.features.update(dict.fromkeys(PROXY_PREDICTORS, 0.0))
        else:
            p.features.update(measured[(p.candidate.name, p.target)].predictors)


def to_markdown(cal: Calibration) -> str:
    lines = [
        "| target | measure | predictor | branches | pairs | Spearman | Kendall |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in cal.rows:
        lines.append(
            f"| {r.target} | {r.measure} | {r.predictor} | {r.n} | {r.pairs} | "
            f"{r.spearman:+.3f} | {r.kendall:+.3f} |"
        )
    return "\n".join(lines)


def write_calibration(cal: Calibration, out: Path) -> list[Path]:
    """calibration.csv and .md, advice.csv (predictions with the measured values) and, when
    matplotlib is installed, calibration.png."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "calibration.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["target", "measure", "predictor", "branches", "pairs", "spearman", "kendall"])
        for r in cal.rows:
            w.writerow([r.target, r.measure, r.predictor, r.n, r.pairs, r.spearman, r.kendall])
    (out / "calibration.md").write_text(to_markdown(cal) + "\n")
    from midtrain.study.advisor import prediction_row

    rows = [
        {
            **prediction_row(p, cal.advice.rank_by),
            **{f"measured_{m}": v for m, v in cal.measured[(p.target, p.candidate.name)].items()},
        }
        for p in cal.advice.predictions
    ]
    with (out / "advice.csv").open("w", newline="") as f:
        table = csv.DictWriter(f, fieldnames=list(rows[0]))
        table.writeheader()
        table.writerows(rows)
    written = [out / "calibration.csv", out / "calibration.md", out / "advice.csv"]
    figure = plot(cal, out / "calibration.png")
    return written + ([figure] if figure else [])


def plot(cal: Calibration, path: Path) -> Path | None:
    """Predicted vs measured, one panel per measure, a colour per target; None (and a one-line
    note) without matplotlib (the optional extra ``midtrain[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("no figure: matplotlib is not installed (pip install 'midtrain[plot]')")
        return None
    panels = [("in_domain", cal.advice.rank_by), ("forgetting", "retention")]
    if "proxy_seen" in cal.advice.predictions[0].features:  # measured beside the guesses
        panels += [("in_domain", "proxy_seen"), ("forgetting", "proxy_retention")]
    fig, grid = plt.subplots(len(panels) // 2, 2, figsize=(10, 4.2 * (len(panels) // 2)))
    axes = np.atleast_1d(grid).ravel()
    for ax, (measure, predictor) in zip(axes, panels, strict=True):
        for target in dict.fromkeys(p.target for p in cal.advice.predictions):
            preds = cal.advice.for_target(target)
            x = [p.features[predictor] for p in preds]
            y = [cal.measured[(target, p.candidate.name)][measure] for p in preds]
            ax.scatter(x, y, label=target)
            for p, xi, yi in zip(preds, x, y, strict=True):
                ax.annotate(p.candidate.name, (xi, yi), fontsize=6, alpha=0.7)
        ax.set_xlabel(f"predicted: {predictor}")
        ax.set_ylabel(f"measured: {MEASURES[measure]}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(title="target")
    fig.suptitle(f"mixture advisor vs {Path(cal.study).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
