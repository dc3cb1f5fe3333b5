"""The proxy sweep (``midtrain advise --proxy <sweep.yaml>``): K proxies (``study.proxy``) from
one or more checkpoints of a pretraining run, the candidate mixtures from a grid or from
Dirichlet samples (as RegMix), the mixture regression (``study.regression``) fitted on them, and
per SFT target the predicted best mixture with its interval, the compute spent as a fraction of
the full study's and, optionally, the measured loss of a soup of the best proxies."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from midtrain.configs import load_yaml_file, resolve_config
from midtrain.errors import MidtrainError
from midtrain.study.config import expand_grid, fit_args
from midtrain.study.proxy import (
    ANNEALS,
    Measured,
    PretrainRun,
    Proxy,
    Scorer,
    check_length,
    own_checkpoint,
    plan_stages,
    run_stages,
    score_stage,
    soup_rows,
    start_checkpoint,
    with_controls,
)
from midtrain.study.regression import MixtureRegression, fit_arrays, require_extra

RANK_BY = ("proxy_seen", "proxy")
SWEEP_KEYS = {
    "output", "run", "starts", "checkpoints", "steps", "lr_schedule", "candidates", "general",
    "sft", "rank_by", "soup", "pool", "level", "seed", "args",
}  # fmt: skip
SFT_KEYS = {"config", "targets", "steps", "lr", "args"}


@dataclass
class SweepConfig:
    """A proxy sweep, as its YAML spells it (docs/study.md, configs/advise/proxy-cpu.yaml)."""

    output: str
    run: str
    steps: int
    candidates: dict[str, Any]
    general: str
    sft: dict[str, Any]
    starts: list[int] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    lr_schedule: str = "anneal"
    rank_by: str = "proxy_seen"
    soup: int = 0
    pool: int = 2000
    level: float = 0.9
    seed: int = 0
    args: list[str] = field(default_factory=list)


def load_sweep(path: str) -> SweepConfig:
    """The sweep YAML, with one line for a missing or unknown key."""
    resolved = resolve_config(path)
    if not resolved.is_file():
        raise MidtrainError(f"--proxy: {path} not found; give the sweep's YAML")
    raw = load_yaml_file(resolved)
    if not isinstance(raw, dict):
        raise MidtrainError(f"--proxy: {path} is not a mapping of the sweep's keys")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise MidtrainError(
            f"{path}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(SWEEP_KEYS))})"
        )
    missing = [
        k for k in ("output", "run", "steps", "candidates", "general", "sft") if k not in raw
    ]
    if missing:
        raise MidtrainError(f"{path}: give `{missing[0]}` (see docs/study.md, the proxy sweep)")
    return SweepConfig(**raw)


def _starts(cfg: SweepConfig, run: PretrainRun) -> list[tuple[int, Path]]:
    """(start step, checkpoint) per start: ``starts`` looked up in the run, or ``checkpoints``
    named by path (each must be one of the run's own)."""
    if bool(cfg.starts) == bool(cfg.checkpoints):
        raise MidtrainError(
            "starts: give either `starts` (steps) or `checkpoints` (files of the run)"
        )
    if cfg.checkpoints:
        found = [own_checkpoint(run, c, f"checkpoints[{i}]") for i, c in enumerate(cfg.checkpoints)]
    else:
        for s in cfg.starts:
            if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
                raise MidtrainError(f"starts: {s!r} is not an optimizer step > 0")
        found = [(s, start_checkpoint(run, s, "starts")) for s in cfg.starts]
    steps = [s for s, _ in found]
    if len(set(steps)) != len(steps):
        raise MidtrainError(f"starts: {steps} repeats a start step")
    return found


def grid_proxies(g: Any, starts: Sequence[tuple[int, Path]], base: dict[str, float]) -> list[Proxy]:
    """Every start × domain × weight × ramp of ``candidates.grid`` (the study's grid syntax,
    ``domain`` may be a list): the domain at weight w, the run's mixture scaled by 1 − w."""
    if not isinstance(g, dict) or "start" in g:
        raise MidtrainError(
            "candidates.grid: give {domain, weight, ramp_steps, ramp} (the start steps are "
            "the sweep's `starts`)"
        )
    domains = g.get("domain")
    domains = domains if isinstance(domains, list) else [domains]
    checkpoint = dict(starts)
    out = []
    for d in domains:
        spec = {**g, "domain": d, "start": list(checkpoint)}
        try:
            points = expand_grid(f"proxy-{d}", spec, base)
        except MidtrainError as e:  # the study's grid check, named as the sweep spells it
            raise MidtrainError(
                str(e).replace(f"branches.proxy-{d}.grid", "candidates.grid")
            ) from None
        for name, b in points.items():
            ramp = (b.get("ramp_steps", 0), b.get("ramp", "linear"))
            out.append(Proxy(name, b["step"], checkpoint[b["step"]], b["weights"], *ramp, domain=d))
    return out


def dirichlet_weights(spec: dict[str, Any], n: int, seed: int) -> tuple[list[str], np.ndarray]:
    domains, alpha = spec.get("domains"), spec.get("alpha", 1.0)
    if not isinstance(domains, list) or len(domains) < 2:
        raise MidtrainError("candidates.dirichlet.domains: give a list of at least 2 domains")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise MidtrainError(f"candidates.dirichlet.alpha: {alpha!r} is not > 0")
    rng = np.random.default_rng(seed)
    return domains, np.round(rng.dirichlet([float(alpha)] * len(domains), n), 3)


def dirichlet_proxies(spec: Any, starts: Sequence[tuple[int, Path]], seed: int) -> list[Proxy]:
    """``samples`` mixtures of ``domains`` drawn from a symmetric Dirichlet(``alpha``), the same
    draws at every start step (so the starts compare like for like)."""
    if not isinstance(spec, dict) or set(spec) - {
        "domains",
        "samples",
        "alpha",
        "ramp_steps",
        "ramp",
    }:
        raise MidtrainError(
            "candidates.dirichlet: give {domains, samples, alpha, ramp_steps, ramp}"
        )
    samples = spec.get("samples")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise MidtrainError(f"candidates.dirichlet.samples: {samples!r} is not a count >= 1")
    domains, draws = dirichlet_weights(spec, samples, seed)
    ramp_steps, ramp = int(spec.get("ramp_steps", 0)), str(spec.get("ramp", "linear"))
    out = []
    for (start, ckpt), (i, w) in itertools.product(starts, enumerate(draws)):
        mix = {d: float(x) for d, x in zip(domains, w, strict=True) if x > 0}
        suffix = f"-r{ramp_steps}" if ramp_steps else ""
        out.append(Proxy(f"dirichlet{i}-s{start}{suffix}", start, ckpt, mix, ramp_steps, ramp))
    return out


def candidate_proxies(
    cfg: SweepConfig, run: PretrainRun, starts: Sequence[tuple[int, Path]]
) -> list[Proxy]:
    c = cfg.candidates
    if not isinstance(c, dict) or len(c) != 1 or set(c) - {"grid", "dirichlet"}:
        raise MidtrainError("candidates: give exactly one of `grid` or `dirichlet`")
    if "grid" in c:
        proxies = grid_proxies(c["grid"], starts, run.base)
    else:
        proxies = dirichlet_proxies(c["dirichlet"], starts, cfg.seed)
    store_domains = set(_domains(run))
    for p in proxies:
        for d in p.weights or {}:
            if store_domains and d not in store_domains:
                raise MidtrainError(
                    f"candidates: domain {d!r} is not in the run's store {run.settings.store} "
                    f"(known: {', '.join(sorted(store_domains))})"
                )
    return proxies


def _domains(run: PretrainRun) -> list[str]:
    from midtrain.data.store import Store

    try:
        return list(Store(run.settings.store).domain_names)
    except MidtrainError:
        return []


def scorers(cfg: SweepConfig) -> list[Scorer]:
    """One scorer per SFT target: the SFT config with the target's data overrides."""
    sft = cfg.sft
    if (
        not isinstance(sft, dict)
        or set(sft) - SFT_KEYS
        or "config" not in sft
        or not sft.get("targets")
    ):
        raise MidtrainError(
            "sft: give `config` (SFT fit configs) and `targets`, optionally `steps`, `lr`, `args`"
        )
    steps = int(sft.get("steps", 0))
    extra = [f"--model.lr={sft['lr']}"] if sft.get("lr") is not None else []
    base = fit_args(list(sft["config"]), [*sft.get("args", []), *extra], "sft.config")
    out = []
    for target, data in sft["targets"].items():
        if not isinstance(data, dict) or "target" not in data:
            raise MidtrainError(f"sft.targets.{target}: give `target`, the SFT domain")
        overrides = [
            f"--data.init_args.{k}={v if isinstance(v, str) else json.dumps(v)}"
            for k, v in data.items()
        ]
        args = [*base, *overrides, f"--data.init_args.general_val_sets=[{cfg.general}]"]
        out.append(Scorer(target, str(data["target"]), cfg.general, args, steps))
    return out


@dataclass
class Best:
    """The predicted best mixture of the pool for one target, with its interval."""

    target: str
    features: dict[str, float]
    predicted: float
    low: float
    high: float
    regression: MixtureRegression
    best_measured: str


@dataclass
class SweepResult:
    cfg: SweepConfig
    proxies: list[Proxy]
    measured: dict[tuple[str, str], Measured]
    best: list[Best]
    proxy_steps: int
    full_steps: int
    seconds: float
    soups: dict[str, tuple[list[str], float, float]] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.proxy_steps / self.full_steps


def feature_row(p: Proxy, domains: Sequence[str], base: dict[str, float]) -> dict[str, float]:
    """A proxy's regression features: each domain's weight after its switch, start, ramp."""
    mix = p.weights or base
    total = sum(mix.values())
    row = {f"weight/{d}": mix.get(d, 0.0) / total for d in domains}
    return {**row, "start": float(p.start), "ramp_steps": float(p.ramp_steps)}


def check_counts(
    proxies: Sequence[Proxy], domains: Sequence[str], base: dict[str, float]
) -> list[str]:
    """The features that vary among the proxies; refuses too few proxies for them."""
    rows = [feature_row(p, domains, base) for p in proxies]
    varying = [k for k in rows[0] if len({r[k] for r in rows}) > 1]
    if len(rows) < len(varying) + 2:
        raise MidtrainError(
            f"candidates: {len(rows)} proxies (controls included) for {len(varying)} varying "
            f"features; the regression needs at least {len(varying) + 2}: add candidates"
        )
    return varying


def pool_rows(
    cfg: SweepConfig, proxies: Sequence[Proxy], domains: Sequence[str], base: dict[str, float]
) -> list[dict[str, float]]:
    """Mixtures to predict: the proxies' own points, and finer ones between them (grid: 21
    weights across the grid's range per domain; Dirichlet: ``pool`` more draws), at the
    measured start steps and ramps."""
    rows = [feature_row(p, domains, base) for p in proxies]
    starts = sorted({p.start for p in proxies})
    ramps = sorted({(p.ramp_steps, p.ramp) for p in proxies})
    extra = []
    if "grid" in cfg.candidates:
        ws = [float(w) for w in cfg.candidates["grid"]["weight"]]
        for d in sorted({p.domain for p in proxies if p.domain}):
            for w in np.linspace(min(ws), max(ws), 21):
                mix = {k: v * (1 - w) for k, v in base.items()}
                mix[d] = mix.get(d, 0.0) + w
                extra.append(mix)
    else:
        names, draws = dirichlet_weights(cfg.candidates["dirichlet"], cfg.pool, cfg.seed + 1)
        extra = [dict(zip(names, map(float, w), strict=True)) for w in draws]
    for mix, s, (r, shape) in itertools.product(extra, starts, ramps):
        rows.append(feature_row(Proxy("pool", s, Path(), mix, r, shape), domains, base))
    return rows


def predict_best(
    target: str,
    rows: list[dict[str, float]],
    y: np.ndarray,
    names: list[str],
    pool: list[dict[str, float]],
    features: list[str],
    cfg: SweepConfig,
) -> Best:
    """Fit on the proxies, predict the pool, keep the highest (a tie goes to the point nearest
    the best measured proxy)."""
    x = np.array([[r[f] for f in features] for r in rows])
    reg = fit_arrays(x, y, features, f"{target}/{cfg.rank_by}", "auto", cfg.level, cfg.seed)
    px = np.array([[r[f] for f in features] for r in pool])
    pred, low, high = reg.predict(px)
    top = x[int(np.argmax(y))]
    scale = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    near = np.linalg.norm((px - top) / scale, axis=1)
    i = min(range(len(pool)), key=lambda j: (-round(float(pred[j]), 9), float(near[j])))
    return Best(
        target,
        pool[i],
        float(pred[i]),
        float(low[i]),
        float(high[i]),
        reg,
        names[int(np.argmax(y))],
    )


def plan_sweep(cfg: SweepConfig) -> tuple[PretrainRun, list[Proxy], list[Scorer], list[str]]:
    """Every check of the sweep, before anything runs or is written."""
    require_extra()
    if cfg.lr_schedule not in ANNEALS:
        raise MidtrainError(f"lr_schedule: {cfg.lr_schedule!r} is not one of {', '.join(ANNEALS)}")
    if cfg.rank_by not in RANK_BY:
        raise MidtrainError(f"rank_by: {cfg.rank_by!r} is not one of {', '.join(RANK_BY)}")
    if isinstance(cfg.soup, bool) or not isinstance(cfg.soup, int) or cfg.soup < 0 or cfg.soup == 1:
        raise MidtrainError(
            f"soup: {cfg.soup!r}; give 0 (none) or the number of proxies to average (>= 2)"
        )
    run = PretrainRun.of(cfg.run, "run")
    starts = _starts(cfg, run)
    proxies = with_controls(candidate_proxies(cfg, run, starts))
    check_length(proxies, cfg.steps, run.settings.max_steps, "steps")
    domains = sorted({d for p in proxies for d in (p.weights or run.base)})
    features = check_counts(proxies, domains, run.base)
    return run, proxies, scorers(cfg), features


def _average(checkpoints: Sequence[Path], out: Path, say: Callable[[str], None]) -> Path:
    """``midtrain average`` (the public command) of the members, written anew."""
    import subprocess
    import sys

    out.unlink(missing_ok=True)  # its members may have changed since: averaged anew
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "midtrain", "average", *map(str, checkpoints), "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MidtrainError(
            f"soup: `midtrain average` failed: {proc.stderr.strip().splitlines()[-1:]}"
        )
    say(f"soup: {out} = mean of {', '.join(c.parent.parent.name for c in checkpoints)}")
    return out


def soups(
    cfg: SweepConfig,
    proxies: Sequence[Proxy],
    measured: dict[tuple[str, str], Measured],
    targets: Sequence[Scorer],
    say: Callable[[str], None],
) -> dict[str, tuple[list[str], float, float]]:
    """Per target: the soup of its ``soup`` best proxies, scored like a proxy: (its members,
    its in-domain loss, the best member's)."""
    from midtrain.checkpoint.layout import LAST, run_checkpoints
    from midtrain.study.proxy import read_scores

    root = Path(cfg.output)
    out = {}
    for s in targets:
        members = soup_rows(measured, proxies, s.target, cfg.soup)
        if len(members) < 2:
            continue
        ckpts = [run_checkpoints(root / "proxies" / p.name) / LAST for p in members]
        soup = _average(ckpts, root / "soups" / f"{s.target}.ckpt", say)
        stage = score_stage(f"soup-{s.target}", soup, s, root, None)
        shutil.rmtree(stage.directory, ignore_errors=True)  # a new soup: scored again
        run_stages([stage], False, say)
        best = min(measured[(p.name, s.target)].in_domain for p in members)
        out[s.target] = ([p.name for p in members], read_scores(stage, s)[0], best)
    return out


def run_sweep(
    cfg: SweepConfig, rerun_changed: bool = False, say: Callable[[str], None] = print
) -> SweepResult:
    """Plan and check, run every proxy and score not done, fit, report."""
    from midtrain.study.proxy import measure_proxies

    run, proxies, targets, features = plan_sweep(cfg)
    root = Path(cfg.output)
    stages = plan_stages(run, proxies, targets, cfg.steps, cfg.lr_schedule, root, cfg.args)
    t0 = time.perf_counter()
    run_stages(stages, rerun_changed, say)
    T = run.settings.max_steps
    measured = measure_proxies(proxies, targets, stages, cfg.steps, T)
    domains = sorted({d for p in proxies for d in (p.weights or run.base)})
    rows = [feature_row(p, domains, run.base) for p in proxies]
    pool = pool_rows(cfg, proxies, domains, run.base)
    names = [p.name for p in proxies]
    best = []
    for s in targets:
        y = np.array([measured[(n, s.target)].predictors[cfg.rank_by] for n in names])
        best.append(predict_best(s.target, rows, y, names, pool, features, cfg))
    result = SweepResult(
        cfg,
        proxies,
        measured,
        best,
        proxy_steps=len(proxies) * cfg.steps,
        full_steps=sum(T - p.start for p in proxies if not p.control),
        seconds=time.perf_counter() - t0,
    )
    if cfg.soup:
        result.soups = soups(cfg, proxies, measured, targets, say)
    say(write_sweep(result, run))
    return result


def describe(features: dict[str, float], base: dict[str, float]) -> str:
    """A mixture as a reader names it: its domains' weights, largest first."""
    weights = {k.removeprefix("weight/"): v for k, v in features.items() if k.startswith("weight/")}
    return ", ".join(
        f"{d} {w:.2f}" for d, w in sorted(weights.items(), key=lambda x: -x[1]) if w > 0
    )


def write_sweep(r: SweepResult, run: PretrainRun) -> str:
    """proxies.csv, best.csv, report.md (and fit-<target>.png with matplotlib); the report."""
    root = Path(r.cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    domains = sorted({d for p in r.proxies for d in (p.weights or run.base)})
    targets = [b.target for b in r.best]
    rows = []
    for p in r.proxies:
        row: dict[str, Any] = {"proxy": p.name, "ramp": p.ramp if p.ramp_steps else ""}
        row.update(feature_row(p, domains, run.base))
        for t in targets:
            m = r.measured[(p.name, t)]
            row[f"{t}/in_domain_loss"], row[f"{t}/general_loss"] = m.in_domain, m.general
            row.update({f"{t}/{k}": v for k, v in m.predictors.items()})
        rows.append(row)
    _write_csv(root / "proxies.csv", rows)
    lines = report_lines(r, run)
    _write_csv(root / "best.csv", [best_row(b, r.cfg.rank_by) for b in r.best])
    (root / "report.md").write_text("\n".join(lines) + "\n")
    figures = [plot_fit(b, r, root / f"fit-{b.target}.png") for b in r.best]
    written = ["proxies.csv", "best.csv", "report.md", *(f.name for f in figures if f)]
    return "\n".join(lines) + f"\n\nwritten {root}/: {', '.join(written)}"


def best_row(b: Best, rank_by: str) -> dict[str, Any]:
    return {
        "target": b.target,
        **b.features,
        "rank_by": rank_by,
        "predicted": b.predicted,
        "low": b.low,
        "high": b.high,
        "model": b.regression.model,
        "best_measured_proxy": b.best_measured,
    }


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


def report_lines(r: SweepResult, run: PretrainRun) -> list[str]:
    cfg = r.cfg
    controls = sum(p.control for p in r.proxies)
    lines = [
        f"proxy sweep of {run.directory}: {len(r.proxies) - controls} proxies and {controls} "
        f"control(s), {cfg.steps} steps each ({cfg.lr_schedule}) from step(s) "
        f"{', '.join(str(s) for s in sorted({p.start for p in r.proxies}))}; {r.seconds:.0f}s",
        f"compute: {r.proxy_steps} proxy steps vs {r.full_steps} for the same candidates as full "
        f"branches to step {run.settings.max_steps}: {r.fraction:.1%} (optimizer steps at the "
        "run's global batch; scoring not counted)",
        "",
        f"| target | predicted best mixture | start | ramp | predicted {cfg.rank_by} | "
        f"{r.best[0].regression.level:.0%} interval | model | best measured proxy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in r.best:
        lines.append(
            f"| {b.target} | {describe(b.features, run.base)} | {b.features['start']:.0f} | "
            f"{b.features['ramp_steps']:.0f} | {b.predicted:+.4f} | [{b.low:+.4f}, {b.high:+.4f}] "
            f"| {b.regression.model} | {b.best_measured} |"
        )
    for target, (members, loss, best) in r.soups.items():
        lines.append(
            f"\nsoup for {target} of {', '.join(members)}: in-domain loss {loss:.4f} "
            f"(best member {best:.4f})"
        )
    for b in r.best:
        lines += ["", f"{b.target}: {b.regression.summary()}"]
    return lines


def plot_fit(b: Best, r: SweepResult, path: Path) -> Path | None:
    """Out-of-fold predicted against measured, one point per proxy (needs matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    chosen = next(s for s in b.regression.cv if s.model == b.regression.model)
    measured = [r.measured[(p.name, b.target)].predictors[r.cfg.rank_by] for p in r.proxies]
    fig = Figure(figsize=(5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter(measured, chosen.out_of_fold)
    for p, x, y in zip(r.proxies, measured, chosen.out_of_fold, strict=True):
        ax.annotate(p.name, (x, y), fontsize=6, alpha=0.7)
    lo, hi = min(measured), max(measured)
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8)
    ax.set_xlabel(f"measured {r.cfg.rank_by}")
    ax.set_ylabel(f"predicted (out-of-fold, {b.regression.model})")
    ax.set_title(f"proxy sweep -> {b.target}")
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path
