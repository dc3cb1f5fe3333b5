"""``midtrain experiment``: a whole midtraining study from one config.

Stages, each a ``midtrain fit`` run in its own directory with its saved, reproducible config:

1. (optional) ``midtrain prepare`` for every listed prepare config (reused when unchanged);
2. the shared pretraining prefix, once: the **baseline** branch, saving a checkpoint at every
   start step a branch needs;
3. every other branch, forked from the prefix at its switch step (``--fork``): a grid of start
   steps costs one shared prefix;
4. SFT of every branch x target x learning rate x seed (``model.init_from`` the branch);
5. the report: best LR per branch and target by in-domain validation loss; mean ± std over
   seeds of in-domain loss and forgetting (general-corpus validation loss after SFT); relative
   improvement vs baseline and a Welch t-test p-value; the proximity advantage of the branch's
   data for the target. Written as results.csv, results.md and TensorBoard HParams.

A finished stage leaves ``done.json``; re-running skips it. An interrupted stage resumes from its
last checkpoint.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from midtrain.errors import MidtrainError
from midtrain.paths import CONFIG, LAST, run_checkpoints, step_checkpoint

# -- config -----------------------------------------------------------------------------------


@dataclass
class PretrainConfig:
    """The base pretraining run: fit config files (stacked) and extra command-line args."""

    config: list[str]
    args: list[str] = field(default_factory=list)


@dataclass
class SFTConfig:
    """SFT stage: fit config files with ``data: midtrain.SFTDataModule`` settings shared by all
    targets; ``targets`` maps a target name to its data init_args overrides (at least
    ``target``, the SFT domain)."""

    config: list[str]
    targets: dict[str, dict[str, Any]]
    lrs: list[float]
    seeds: list[int] = field(default_factory=lambda: [0])
    args: list[str] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    """A study: ``general`` is the general corpus domain (its validation loss after SFT is the
    forgetting measure); ``branches`` are the midtraining/CPT conditions next to the baseline."""

    output: str
    general: str
    pretrain: PretrainConfig
    sft: SFTConfig
    # name -> {grid: {domain, start: [steps], weight: [weights]}} or {switch: {step, weights}}
    branches: dict[str, dict[str, Any]] = field(default_factory=dict)
    prepare: list[str] = field(default_factory=list)
    similarity_docs: int = 200
    similarity_top_k: int = 1000


# -- the plan of stages -----------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    kind: str  # prepare | pretrain | branch | sft
    args: list[str]
    directory: Path
    fork: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _fmt(x: float) -> str:
    return f"{x:g}"


def pretrain_yaml(cfg: ExperimentConfig) -> dict[str, Any]:
    """The pretraining config as the stages see it: files stacked, dotted overrides applied."""
    pre = _merged_yaml(cfg.pretrain.config)
    for arg in cfg.pretrain.args:
        if arg.startswith("--") and "=" in arg and "+=" not in arg:
            key, value = arg[2:].split("=", 1)
            node = pre
            *parents, leaf = key.split(".")
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = yaml.safe_load(value)
    return pre


def base_weights(cfg: ExperimentConfig) -> dict[str, float]:
    """The pretraining mixture (``data.init_args.weights``; the general domain alone if unset)."""
    weights = pretrain_yaml(cfg).get("data", {}).get("init_args", {}).get("weights")
    return {str(k): float(v) for k, v in (weights or {cfg.general: 1.0}).items()}


def expand_branches(cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Branch name -> {step, weights, domain} (the baseline has no switch). A grid point mixes
    its domain in at weight w and scales the pretraining mixture by (1 - w)."""
    base = base_weights(cfg)
    total = sum(base.values())
    out: dict[str, dict[str, Any]] = {"baseline": {"step": None, "weights": None}}
    for name, b in cfg.branches.items():
        where = f"branches.{name}"
        if name == "baseline":
            raise MidtrainError(f"{where}: the baseline is the pretraining run itself")
        if not isinstance(b, dict) or set(b) - {"grid", "switch"} or len(b) != 1:
            raise MidtrainError(f"{where}: give exactly one of `grid` or `switch`")
        if "switch" in b:
            sw = b["switch"]
            if not isinstance(sw, dict) or set(sw) != {"step", "weights"}:
                raise MidtrainError(f"{where}.switch: give `step` and `weights`")
            weights = {str(k): float(v) for k, v in sw["weights"].items()}
            out[name] = {"step": int(sw["step"]), "weights": weights,
                         "domain": max(weights, key=weights.get)}
            continue
        g = b["grid"]
        if not isinstance(g, dict) or set(g) != {"domain", "start", "weight"}:
            raise MidtrainError(f"{where}.grid: give `domain`, `start` (steps), `weight`")
        if not g["start"] or not g["weight"]:
            raise MidtrainError(f"{where}.grid: `start` and `weight` need values")
        for start, w in itertools.product(g["start"], g["weight"]):
            if not 0 < float(w) <= 1:
                raise MidtrainError(f"{where}.grid.weight: {w} is not in (0, 1]")
            w = float(w)
            weights = {d: round(v / total * (1 - w), 10) for d, v in base.items() if w < 1}
            weights[g["domain"]] = round(weights.get(g["domain"], 0.0) + w, 10)
            out[f"{name}-s{start}-w{_fmt(w)}"] = {"step": int(start), "weights": weights,
                                                  "domain": g["domain"]}
    return out


def plan_stages(cfg: ExperimentConfig) -> list[Stage]:
    root = Path(cfg.output)
    stages = [Stage(f"prepare {p}", "prepare", ["--config", p], root / "prepare")
              for p in cfg.prepare]
    branches = expand_branches(cfg)
    fork_steps = sorted({b["step"] for b in branches.values() if b["step"] is not None})
    base_dir = root / "pretrain" / "baseline"
    base_args = [a for c in cfg.pretrain.config for a in ("--config", c)] + cfg.pretrain.args
    callbacks = []
    if fork_steps:
        callbacks = ["--trainer.callbacks+=midtrain.callbacks.CheckpointAtSteps",
                     f"--trainer.callbacks.steps={json.dumps(fork_steps)}"]
    stages.append(Stage("pretrain baseline", "pretrain",
                        [*base_args, *callbacks, f"--trainer.default_root_dir={base_dir}"],
                        base_dir, meta={"branch": "baseline"}))
    for name, b in branches.items():
        if b["step"] is None:
            continue
        d = root / "pretrain" / name
        switch = ["--trainer.callbacks+=midtrain.callbacks.MixtureSwitch",
                  f"--trainer.callbacks.step={b['step']}",
                  f"--trainer.callbacks.weights={json.dumps(b['weights'])}"]
        stages.append(Stage(f"branch {name}", "branch",
                            [*base_args, *switch, f"--trainer.default_root_dir={d}"], d,
                            fork=run_checkpoints(base_dir) / step_checkpoint(b["step"]),
                            meta={"branch": name, **b}))
    sft_args = [a for c in cfg.sft.config for a in ("--config", c)] + cfg.sft.args
    for name in branches:
        parent = run_checkpoints(root / "pretrain" / name) / LAST
        for target, data in cfg.sft.targets.items():
            if "target" not in data:
                raise MidtrainError(f"sft.targets.{target}: give `target`, the SFT domain")
            for lr, seed in itertools.product(cfg.sft.lrs, cfg.sft.seeds):
                d = root / "sft" / name / target / f"lr{_fmt(lr)}-seed{seed}"
                data_args = [f"--data.init_args.{k}={v if isinstance(v, str) else json.dumps(v)}"
                             for k, v in data.items()]
                stages.append(Stage(
                    f"sft {name} {target} lr={_fmt(lr)} seed={seed}", "sft",
                    [*sft_args, *data_args, f"--data.init_args.general_val_sets=[{cfg.general}]",
                     f"--model.init_from={parent}", f"--model.lr={lr}",
                     f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
                     f"--trainer.default_root_dir={d}"],
                    d, meta={"branch": name, "target": target, "lr": lr, "seed": seed,
                             "domain": data["target"]}))
    return stages


# -- running ----------------------------------------------------------------------------------


def _run(argv: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"\n$ midtrain {shlex.join(argv)}\n")
        f.flush()
        proc = subprocess.run([sys.executable, "-m", "midtrain", *argv], stdout=f,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise MidtrainError(f"stage failed (exit {proc.returncode}): {tail[0]} (log: {log})")


def run_stage(stage: Stage) -> str:
    """Run one stage unless done; returns what happened."""
    done = stage.directory / "done.json"
    if stage.kind != "prepare" and done.is_file():
        return "done already"
    log = stage.directory / "stage.log"
    if stage.kind == "prepare":
        _run(["prepare", *stage.args], stage.directory / "prepare.log")
        return "ran"
    args = ["fit", *stage.args]
    last = run_checkpoints(stage.directory) / LAST
    if last.is_file():
        args += ["--ckpt_path", str(last)]  # interrupted: continue where it stopped
        what = "resumed"
    else:
        if stage.fork is not None:
            if not stage.fork.is_file():
                raise MidtrainError(f"{stage.name}: fork point {stage.fork} is missing")
            args += ["--fork", str(stage.fork)]
        what = "ran"
    _run(args, log)
    done.write_text(json.dumps({"stage": stage.name, "finished": time.time(),
                                "meta": stage.meta}, default=str))
    return what


def last_scalar(run_dir: Path, tag: str) -> float:
    """The last value of a TensorBoard scalar in a run directory (the run's own events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    if tag not in ea.Tags()["scalars"]:
        raise MidtrainError(f"{run_dir}: no {tag!r} was logged; does the SFT config validate?")
    return float(ea.Scalars(tag)[-1].value)


# -- statistics -------------------------------------------------------------------------------


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only on this side
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return math.exp(log_front) * f / a


def welch_t_test(x: list[float], y: list[float]) -> float:
    """Two-sided p-value of Welch's unequal-variance t-test; nan with fewer than 2 per side."""
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    mx, my = float(np.mean(x)), float(np.mean(y))
    vx, vy = float(np.var(x, ddof=1)) / len(x), float(np.var(y, ddof=1)) / len(y)
    if vx + vy == 0:
        return 1.0 if mx == my else 0.0
    t = (mx - my) / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    return _betainc(df / 2, 0.5, df / (df + t * t))


# -- the report -------------------------------------------------------------------------------


def collect(cfg: ExperimentConfig, stages: list[Stage]) -> list[dict[str, Any]]:
    rows = []
    for s in stages:
        if s.kind != "sft":
            continue
        m = s.meta
        rows.append({"branch": m["branch"], "target": m["target"], "lr": m["lr"],
                     "seed": m["seed"],
                     "in_domain_loss": last_scalar(s.directory, f"val/{m['domain']}/loss"),
                     "general_loss": last_scalar(s.directory, f"val/{cfg.general}/loss"),
                     "run": str(s.directory)})
    return rows


def summarize(rows: list[dict[str, Any]],
              advantage: dict[tuple[str, str], float] | None = None) -> list[dict[str, Any]]:
    """Per branch and target, at the LR with the best mean in-domain loss."""
    out = []
    keys = sorted({(r["branch"], r["target"]) for r in rows},
                  key=lambda k: (k[1], k[0] != "baseline", k[0]))
    best: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for key in keys:
        runs = [r for r in rows if (r["branch"], r["target"]) == key]
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for r in runs:
            by_lr.setdefault(r["lr"], []).append(r)
        lr = min(by_lr, key=lambda v: np.mean([r["in_domain_loss"] for r in by_lr[v]]))
        best[key] = by_lr[lr]
    for branch, target in keys:
        runs = best[(branch, target)]
        base = best.get(("baseline", target))
        ind = [r["in_domain_loss"] for r in runs]
        gen = [r["general_loss"] for r in runs]
        row = {"target": target, "branch": branch, "best_lr": runs[0]["lr"], "seeds": len(runs),
               "in_domain_mean": float(np.mean(ind)),
               "in_domain_std": float(np.std(ind, ddof=1)) if len(ind) > 1 else 0.0,
               "forgetting_mean": float(np.mean(gen)),
               "forgetting_std": float(np.std(gen, ddof=1)) if len(gen) > 1 else 0.0}
        if base is not None and branch != "baseline":
            b_ind = [r["in_domain_loss"] for r in base]
            b_gen = [r["general_loss"] for r in base]
            row["in_domain_rel_improvement"] = (np.mean(b_ind) - row["in_domain_mean"]) / np.mean(b_ind)
            row["forgetting_rel_improvement"] = (np.mean(b_gen) - row["forgetting_mean"]) / np.mean(b_gen)
            row["in_domain_p"] = welch_t_test(ind, b_ind)
            row["forgetting_p"] = welch_t_test(gen, b_gen)
        if advantage is not None and (branch, target) in advantage:
            row["proximity_advantage"] = advantage[(branch, target)]
        out.append(row)
    return out


def proximity(cfg: ExperimentConfig, stages: list[Stage]) -> dict[tuple[str, str], float]:
    """dist(general, target) − dist(branch's midtraining mix, target), on token statistics of
    the pretraining store and each SFT store (one tokenizer)."""
    from midtrain.data.store import Store
    from midtrain.similarity import blend, similarity, token_counts

    pre = yaml.safe_load(Path(stages_config(stages, "pretrain")).read_text())["data"]["init_args"]
    store = Store(pre["store"])
    branches = expand_branches(cfg)
    n, k = cfg.similarity_docs, cfg.similarity_top_k
    counts = {cfg.general: token_counts(store, cfg.general, n)}
    out = {}
    for s in stages:
        if s.kind != "sft" or s.meta["seed"] != cfg.sft.seeds[0] or s.meta["lr"] != cfg.sft.lrs[0]:
            continue
        sft = yaml.safe_load(Path(stages_config([s], "sft")).read_text())["data"]["init_args"]
        target = token_counts(Store(sft["store"]), sft["target"], n)
        weights = branches[s.meta["branch"]]["weights"] or {cfg.general: 1.0}
        for d in weights:
            counts.setdefault(d, token_counts(store, d, n))
        mix = blend(counts, weights)
        if s.meta["branch"] == "baseline":  # its data is the general corpus: 0 by definition
            out[("baseline", s.meta["target"])] = 0.0
            continue
        general = 1 - similarity(counts[cfg.general], target, k)
        out[(s.meta["branch"], s.meta["target"])] = general - (1 - similarity(mix, target, k))
    return out


def stages_config(stages: list[Stage], kind: str) -> Path:
    stage = next(s for s in stages if s.kind == kind)
    return stage.directory / CONFIG


def write_report(cfg: ExperimentConfig, rows: list[dict[str, Any]],
                 summary: list[dict[str, Any]]) -> str:
    root = Path(cfg.output)
    with (root / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with (root / "summary.csv").open("w", newline="") as f:
        fields = list(dict.fromkeys(k for r in summary for k in r))
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(summary)

    def pm(mean: float, std: float) -> str:
        return f"{mean:.4f} ± {std:.4f}"

    def opt(r: dict[str, Any], key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r and not (isinstance(r[key], float)
                                                        and math.isnan(r[key])) else "–"

    lines = [f"# Results: {root.name}", "",
             f"In-domain: validation loss on the SFT target. Forgetting: validation loss on "
             f"`{cfg.general}` after SFT (lower is better for both). Mean ± std over seeds at "
             f"the best LR (by in-domain loss); Δ = relative improvement vs baseline "
             f"((baseline − x) / baseline); p = Welch t-test vs baseline.", "",
             "| target | branch | best LR | in-domain | Δ | p | forgetting | Δ | p | "
             "proximity adv. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(
            f"| {r['target']} | {r['branch']} | {r['best_lr']:g} | "
            f"{pm(r['in_domain_mean'], r['in_domain_std'])} | "
            f"{opt(r, 'in_domain_rel_improvement', '+.2%')} | {opt(r, 'in_domain_p', '.3g')} | "
            f"{pm(r['forgetting_mean'], r['forgetting_std'])} | "
            f"{opt(r, 'forgetting_rel_improvement', '+.2%')} | {opt(r, 'forgetting_p', '.3g')} | "
            f"{opt(r, 'proximity_advantage', '+.4f')} |")
    table = "\n".join(lines)
    (root / "results.md").write_text(table + "\n")
    _write_hparams(root, rows)
    return table


def _write_hparams(root: Path, rows: list[dict[str, Any]]) -> None:
    """One TensorBoard HParams session per SFT run, so the table is browsable."""
    from torch.utils.tensorboard import SummaryWriter

    for r in rows:
        name = f"{r['branch']}/{r['target']}/lr{_fmt(r['lr'])}-seed{r['seed']}"
        w = SummaryWriter(str(root / "hparams" / name))
        w.add_hparams({"branch": r["branch"], "target": r["target"], "lr": r["lr"],
                       "seed": r["seed"]},
                      {"hparam/in_domain_loss": r["in_domain_loss"],
                       "hparam/forgetting_loss": r["general_loss"]}, run_name=".")
        w.close()


# -- entry points -----------------------------------------------------------------------------


def describe_plan(cfg: ExperimentConfig, stages: list[Stage]) -> str:
    """The stages and, per branch, tokens per domain per phase (no store needed)."""
    from midtrain.data.mixture import MixtureSchedule, Phase

    lines = [f"{len(stages)} stages:"] + [f"  {i}. {s.name}" for i, s in enumerate(stages, 1)]
    pre = pretrain_yaml(cfg)
    data = pre.get("data", {}).get("init_args", {})
    trainer = pre.get("trainer", {})
    max_steps, seq_len = int(trainer.get("max_steps", 0)), int(data.get("seq_len", 512))
    batch = (int(data.get("micro_batch_size", 8)) * int(trainer.get("accumulate_grad_batches", 1))
             * int(trainer.get("devices", 1) if str(trainer.get("devices", 1)).isdigit() else 1))
    base = base_weights(cfg)
    lines.append(f"tokens per domain per phase (global batch {batch} x seq_len {seq_len}, "
                 f"{max_steps} steps):")
    for name, b in expand_branches(cfg).items():
        phases = [Phase(0, base)] + ([Phase(b["step"], b["weights"])] if b["step"] else [])
        domains = sorted({d for p in phases for d in p.weights})
        sched = MixtureSchedule(domains, phases, batch)
        ends = [*sched.starts[1:].tolist(), max_steps]
        for start, end in zip(sched.starts.tolist(), ends, strict=True):
            drawn = sched.draws_between(start, end) * seq_len
            parts = ", ".join(f"{d} {int(t):,}" for d, t in zip(domains, drawn, strict=True) if t)
            lines.append(f"  {name:<28} steps {start}-{end}: {parts}")
    return "\n".join(lines)


def _merged_yaml(files: list[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {}

    def merge(a: dict, b: dict) -> dict:
        for k, v in b.items():
            a[k] = merge(dict(a.get(k) or {}), v) if isinstance(v, dict) else v
        return a

    for f in files:
        if not Path(f).is_file():
            raise MidtrainError(f"config file not found: {f}")
        merge(merged, yaml.safe_load(Path(f).read_text()) or {})
    return merged


def run_experiment(cfg: ExperimentConfig, dry_run: bool = False) -> str:
    for f in [*cfg.pretrain.config, *cfg.sft.config, *cfg.prepare]:
        if not Path(f).is_file():
            raise MidtrainError(f"config file not found: {f}")
    if not cfg.sft.targets:
        raise MidtrainError("sft.targets: name at least one SFT target")
    if not cfg.sft.lrs or not cfg.sft.seeds:
        raise MidtrainError("sft.lrs and sft.seeds need at least one value each")
    stages = plan_stages(cfg)
    print(describe_plan(cfg, stages))
    if dry_run:
        return ""
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    for i, stage in enumerate(stages, 1):
        t0 = time.perf_counter()
        print(f"[stage {i}/{len(stages)}] {stage.name} ...", flush=True)
        what = run_stage(stage)
        print(f"[stage {i}/{len(stages)}] {stage.name}: {what} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    rows = collect(cfg, stages)
    table = write_report(cfg, rows, summarize(rows, proximity(cfg, stages)))
    print("\n" + table)
    print(f"\nwritten {Path(cfg.output) / 'results.csv'}, results.md; "
          f"tensorboard --logdir {cfg.output}")
    return table
