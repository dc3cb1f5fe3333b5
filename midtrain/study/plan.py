"""The plan of a study: its stages (each a ``midtrain fit`` or ``midtrain prepare``) and, per
branch, the tokens each domain contributes in each phase (``midtrain.data.mixture.plan_rows``,
the same rows ``fit`` prints)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from midtrain.checkpoint.layout import LAST, run_checkpoints, step_checkpoint
from midtrain.data.mixture import MixtureSchedule, Phase, format_plan, plan_rows
from midtrain.study.config import (
    ExperimentConfig,
    FitSettings,
    check,
    expand_branches,
    fit_args,
    pretraining_data,
    pretraining_weights,
    resolved_fit_config,
)

if TYPE_CHECKING:
    from midtrain.data.datamodule import MixtureDataModule


@dataclass
class Stage:
    """One command of the study. ``parent`` names the stage whose result this one starts from
    (a branch forks the baseline; an SFT run starts from its branch): a changed parent makes
    this stage stale too."""

    name: str
    kind: str  # prepare | pretrain | branch | sft | score (midtrain validate)
    args: list[str]
    directory: Path
    fork: Path | None = None
    parent: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Study:
    """A planned study: the resolved pretraining settings, the branches and the stages."""

    cfg: ExperimentConfig
    settings: FitSettings
    base_weights: dict[str, float]
    branches: dict[str, dict[str, Any]]
    stages: list[Stage]
    data: MixtureDataModule | None = None  # the baseline's, when its store is prepared

    def mixture_rows(self) -> dict[str, list[dict[str, Any]]]:
        """Branch -> the rows of its mixture plan (``plan_rows``): the baseline's schedule with
        the branch's switch, at the run's global batch and seed."""
        s = self.settings
        blocks = None
        if self.data is not None:
            blocks = {
                n: self.data.store.domain(n).train.num_blocks(s.seq_len) for n in self.data.domains
            }
        out = {}
        for name, b in self.branches.items():
            phases = [Phase(0, self.base_weights)]
            if b["step"] is not None:
                ramp = (b.get("ramp_steps", 0), b.get("ramp", "linear"))
                phases.append(Phase(b["step"], b["weights"], *ramp))
            domains = (
                self.data.domains
                if self.data is not None
                else list(dict.fromkeys(d for p in phases for d in p.weights))
            )
            sched = MixtureSchedule(domains, phases, s.global_batch, s.seed)
            out[name] = plan_rows(sched, s.max_steps, s.seq_len, blocks)
        return out


def realized_mixture(rows: list[dict[str, Any]], phase: int) -> dict[str, float]:
    """The share of every global batch each domain holds in one phase of a plan."""
    return {r["domain"]: r["share"] for r in rows if r["phase"] == phase}


def _fmt(x: float) -> str:
    return f"{x:g}"


def stage_dir(
    root: Path,
    branch: str,
    target: str | None = None,
    lr: float | None = None,
    seed: int | None = None,
) -> Path:
    """The study's layout: ``pretrain/<branch>`` and ``sft/<branch>/<target>/lr<lr>-seed<s>``."""
    if target is None:
        return root / "pretrain" / branch
    assert lr is not None  # an SFT run's directory names its learning rate
    return root / "sft" / branch / target / f"lr{_fmt(lr)}-seed{seed}"


def plan_study(cfg: ExperimentConfig) -> Study:
    """Check the study and plan it; reads configs (and the store if prepared), writes nothing."""
    check(cfg)
    root = Path(cfg.output)
    pre_args = fit_args(cfg.pretrain.config, cfg.pretrain.args, "pretrain.config")
    settings = FitSettings.of(resolved_fit_config(pre_args))
    data = pretraining_data(settings)
    base = pretraining_weights(settings)
    branches = expand_branches(cfg, base, settings.max_steps)

    stages = [
        Stage(f"prepare {p}", "prepare", ["--config", c], root / "prepare")
        for p, c in zip(cfg.prepare, fit_args(cfg.prepare, [], "prepare")[1::2], strict=True)
    ]
    stages += _pretrain_stages(root, pre_args, branches)
    stages += _sft_stages(cfg, root, branches)
    return Study(cfg, settings, base, branches, stages, data)


def _pretrain_stages(
    root: Path, pre_args: list[str], branches: dict[str, dict[str, Any]]
) -> list[Stage]:
    """The baseline (saving a checkpoint at every fork step) and one forked run per branch."""
    fork_steps = sorted({b["step"] for b in branches.values() if b["step"] is not None})
    base_dir = stage_dir(root, "baseline")
    callbacks = []
    if fork_steps:
        callbacks = [
            "--trainer.callbacks+=midtrain.callbacks.CheckpointAtSteps",
            f"--trainer.callbacks.steps={json.dumps(fork_steps)}",
        ]
    stages = [
        Stage(
            "pretrain baseline",
            "pretrain",
            [*pre_args, *callbacks, f"--trainer.default_root_dir={base_dir}"],
            base_dir,
            meta={"branch": "baseline"},
        )
    ]
    for name, b in branches.items():
        if b["step"] is None:
            continue
        d = stage_dir(root, name)
        switch = [
            "--trainer.callbacks+=midtrain.callbacks.MixtureSwitch",
            f"--trainer.callbacks.step={b['step']}",
            f"--trainer.callbacks.weights={json.dumps(b['weights'])}",
        ]
        if b.get("ramp_steps"):  # only then: a jump's argv (and fingerprint) stays as it was
            switch += [
                f"--trainer.callbacks.ramp_steps={b['ramp_steps']}",
                f"--trainer.callbacks.ramp={b['ramp']}",
            ]
        stages.append(
            Stage(
                f"branch {name}",
                "branch",
                [*pre_args, *switch, f"--trainer.default_root_dir={d}"],
                d,
                fork=run_checkpoints(base_dir) / step_checkpoint(b["step"]),
                parent="pretrain baseline",
                meta={"branch": name, **b},
            )
        )
    return stages


def _sft_stages(
    cfg: ExperimentConfig, root: Path, branches: dict[str, dict[str, Any]]
) -> list[Stage]:
    """One SFT run per branch, target, learning rate and seed, from the branch's last checkpoint."""
    sft_args = fit_args(cfg.sft.config, cfg.sft.args, "sft.config")
    stages = []
    for name in branches:
        parent = "pretrain baseline" if name == "baseline" else f"branch {name}"
        init_from = run_checkpoints(stage_dir(root, name)) / LAST
        for target, data_args in cfg.sft.targets.items():
            overrides = [
                f"--data.init_args.{k}={v if isinstance(v, str) else json.dumps(v)}"
                for k, v in data_args.items()
            ]
            for lr, seed in itertools.product(cfg.sft.lrs, cfg.sft.seeds):
                d = stage_dir(root, name, target, lr, seed)
                stages.append(
                    Stage(
                        f"sft {name} {target} lr={_fmt(lr)} seed={seed}",
                        "sft",
                        [
                            *sft_args,
                            *overrides,
                            f"--data.init_args.general_val_sets=[{cfg.general}]",
                            f"--model.init_from={init_from}",
                            f"--model.lr={lr}",
                            f"--seed_everything={seed}",
                            f"--data.init_args.seed={seed}",
                            f"--trainer.default_root_dir={d}",
                        ],
                        d,
                        parent=parent,
                        meta={
                            "branch": name,
                            "target": target,
                            "lr": lr,
                            "seed": seed,
                            "domain": data_args["target"],
                        },
                    )
                )
    return stages


def describe_plan(study: Study) -> str:
    """The stages and, per branch, tokens per domain per phase with realized shares."""
    s = study.settings
    stages = study.stages
    lines = [f"{len(stages)} stages:"] + [f"  {i}. {x.name}" for i, x in enumerate(stages, 1)]
    procs = (
        "devices from the hardware, counted as 1"
        if s.world_size is None
        else f"{s.world_size} process{'es' if s.world_size > 1 else ''}"
    )
    lines.append(
        f"tokens per domain per phase (global batch {s.global_batch} = micro batch "
        f"{s.micro_batch_size} x accumulation {s.accumulation} x {procs}; seq_len "
        f"{s.seq_len}; {s.max_steps} steps"
        + ("; store not prepared yet: nothing available to count" if study.data is None else "")
        + "):"
    )
    for name, rows in study.mixture_rows().items():
        lines.append(format_plan(rows, s.seq_len, title=f"branch {name}:"))
    return "\n".join(lines)
