"""Proxy runs: measure candidate mixtures with short branches instead of guessing
(``midtrain advise --proxy <sweep.yaml>``, and the ``proxy`` predictors of ``advise --check
--proxy_steps N``).

A proxy is a microanneal: ``midtrain fit --fork`` from a checkpoint of the pretraining run at
its start step S, the candidate's mixture from S on (a ``MixtureSwitch``, ramp included), N
optimizer steps with the learning rate annealed from the checkpoint's to ``min_lr``
(``lr_schedule: anneal``). A **control** from the same checkpoint continues the run's own
mixture for the same N steps. Each proxy and control is then scored on every SFT target's
validation set and the general set: ``midtrain validate`` with the target's SFT config (or,
with ``sft.steps``, a short SFT first). Every proxy, control and score is a stage of the study
runner (``study.run``): named, fingerprinted, resumable, refused when its config changed.

Measured per proxy and target, against the control from the same checkpoint:

* ``proxy``: (L_control − L_proxy) / L_control of the in-domain validation loss, the study's
  relative improvement after N steps; blind to how long the branch would train its mixture;
* ``proxy_seen``: ``proxy`` × (T − S) / N, T the run's ``trainer.max_steps``: the measured gain
  per proxy step, extrapolated linearly to the steps a full branch trains its mixture, so an
  earlier start counts for more (the measured counterpart of ``proximity_seen``);
* ``proxy_retention``: the same extrapolated relative change of the general validation loss
  (negative: forgetting), the counterpart of ``retention``.

The sweep fits the mixture regression (``study.regression``) on its proxies, predicts a pool of
mixtures around them and reports per target the predicted best with its interval, the compute
spent as a fraction of the full study's, and optionally a soup of its best proxies.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from midtrain.checkpoint.layout import CONFIG, LAST, run_checkpoints, step_checkpoint
from midtrain.errors import MidtrainError
from midtrain.study.config import FitSettings, pretraining_weights
from midtrain.study.plan import Stage
from midtrain.study.report import last_scalars
from midtrain.study.run import check_stages, run_stage

ANNEALS = ("anneal", "anneal_wsd")  # the fork schedules a proxy may use (model.lr_schedule)
PROXY_PREDICTORS = ("proxy", "proxy_seen", "proxy_retention")


@dataclass(frozen=True)
class Proxy:
    """One proxy branch: ``weights`` from ``start`` on (None: the control, the run's own
    mixture), forked from ``checkpoint``."""

    name: str
    start: int
    checkpoint: Path
    weights: dict[str, float] | None = None
    ramp_steps: int = 0
    ramp: str = "linear"
    domain: str | None = None  # a grid point's domain (its weight is ``weights[domain]``)

    @property
    def control(self) -> bool:
        return self.weights is None


@dataclass(frozen=True)
class Scorer:
    """How a proxy is scored for one SFT target: ``midtrain validate`` (``sft_steps`` 0) or a
    short SFT with these arguments; ``val/<domain>/loss`` is in-domain, ``val/<general>/loss``
    the general set."""

    target: str
    domain: str
    general: str
    args: list[str]
    sft_steps: int = 0


@dataclass
class PretrainRun:
    """The pretraining run proxies fork from: its directory, saved config and settings."""

    directory: Path
    settings: FitSettings
    base: dict[str, float]
    resumed: bool = False  # its saved config names a ckpt_path (a resume rewrites config.yaml)

    @property
    def config(self) -> Path:
        return self.directory / CONFIG

    @classmethod
    def of(cls, directory: str | Path, where: str) -> PretrainRun:
        d = Path(directory)
        if not (d / CONFIG).is_file():
            raise MidtrainError(
                f"{where}: {d} is not a run directory of `midtrain fit` (no {CONFIG}); give the "
                "pretraining run's trainer.default_root_dir"
            )
        config = yaml.safe_load((d / CONFIG).read_text()) or {}
        settings = FitSettings.of(config)
        return cls(d, settings, pretraining_weights(settings), config.get("ckpt_path") is not None)


def checkpoint_step(path: Path, where: str) -> int:
    """A checkpoint's optimizer step, or one line naming it."""
    from midtrain.checkpoint.files import read_metadata

    try:
        return int(read_metadata(path)["global_step"])
    except MidtrainError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise MidtrainError(f"{where}: {path} is not a readable checkpoint ({e})") from None


def start_checkpoint(run: PretrainRun, step: int, where: str) -> Path:
    """The run's checkpoint at ``step``: ``step=<S>.ckpt`` or any of its checkpoints at S."""
    directory = run_checkpoints(run.directory)
    named = directory / step_checkpoint(step)
    if named.is_file():
        return named
    for path in sorted(directory.glob("*.ckpt")) if directory.is_dir() else []:
        if checkpoint_step(path, where) == step:
            return path
    raise MidtrainError(
        f"{where}: the run {run.directory} has no checkpoint at step {step} (looked for "
        f"{named}); save one with midtrain.callbacks.CheckpointAtSteps or pick a step it has"
    )


def own_checkpoint(run: PretrainRun, path: str, where: str) -> tuple[int, Path]:
    """A checkpoint named by path must be one of the run's own (in its checkpoints/)."""
    p = Path(path)
    if not p.is_file():
        raise MidtrainError(f"{where}: {path} not found")
    if p.resolve().parent != run_checkpoints(run.directory).resolve():
        raise MidtrainError(
            f"{where}: {path} is not a checkpoint of the run {run.directory} (not in its "
            f"{run_checkpoints(run.directory)}); give one of that run's own checkpoints"
        )
    return checkpoint_step(p, where), p


def check_length(proxies: Sequence[Proxy], steps: int, max_steps: int, where: str) -> None:
    """Every proxy (and its ramp) fits inside the pretraining run."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise MidtrainError(f"{where}: {steps!r} is not a number of optimizer steps > 0")
    for p in sorted(proxies, key=lambda p: p.control):  # a candidate named before a control
        if p.start + steps > max_steps:
            raise MidtrainError(
                f"{where}: {steps} proxy steps from {p.name}'s start step {p.start} run past the "
                f"run's trainer.max_steps={max_steps}; give at most {max_steps - p.start}"
            )
        if p.ramp_steps > steps:
            raise MidtrainError(
                f"{where}: {p.name} ramps over {p.ramp_steps} steps, longer than the {steps} "
                "proxy steps; give at least as many proxy steps as the longest ramp"
            )


def proxy_args(
    run: PretrainRun, p: Proxy, steps: int, schedule: str, extra: Sequence[str]
) -> list[str]:
    """``midtrain fit`` arguments of a proxy (``--fork`` and the directory are the stage's):
    the run's saved config, its callbacks replaced by the proxy's switch, N annealed steps,
    no validation (the scores are stages of their own)."""
    args = [
        "--config",
        str(run.config),
        "--trainer.logger=true",
        "--trainer.callbacks=[]",
        f"--trainer.max_steps={p.start + steps}",
        "--trainer.limit_val_batches=0",
        f"--model.lr_schedule={schedule}",
    ]
    if run.resumed:  # a proxy starts from --fork, never from the run's own resume point
        args.append("--ckpt_path=null")
    if not p.control:
        args += [
            "--trainer.callbacks+=midtrain.callbacks.MixtureSwitch",
            f"--trainer.callbacks.step={p.start}",
            f"--trainer.callbacks.weights={json.dumps(p.weights)}",
        ]
        if p.ramp_steps:
            args += [
                f"--trainer.callbacks.ramp_steps={p.ramp_steps}",
                f"--trainer.callbacks.ramp={p.ramp}",
            ]
    return [*args, *extra]


def plan_stages(
    run: PretrainRun,
    proxies: Sequence[Proxy],
    scorers: Sequence[Scorer],
    steps: int,
    schedule: str,
    root: Path,
    extra: Sequence[str] = (),
) -> list[Stage]:
    """A stage per proxy (``proxies/<name>``) and per proxy and target (``scores/<name>/<t>``)."""
    stages = []
    for p in proxies:
        d = root / "proxies" / p.name
        args = [*proxy_args(run, p, steps, schedule, extra), f"--trainer.default_root_dir={d}"]
        stages.append(
            Stage(f"proxy {p.name}", "branch", args, d, fork=p.checkpoint, meta={"proxy": p.name})
        )
    for p in proxies:
        last = run_checkpoints(root / "proxies" / p.name) / LAST
        stages += [score_stage(p.name, last, s, root, f"proxy {p.name}") for s in scorers]
    return stages


def score_stage(name: str, weights: Path, s: Scorer, root: Path, parent: str | None) -> Stage:
    """Score one model for one target: validate it, or fine-tune it briefly first."""
    d = root / "scores" / name / s.target
    args = [*s.args, f"--model.init_from={weights}", f"--trainer.default_root_dir={d}"]
    kind = "score"
    if s.sft_steps:
        kind = "sft"
        args += [
            f"--trainer.max_steps={s.sft_steps}",
            f"--trainer.val_check_interval={s.sft_steps}",
        ]
    meta = {"proxy": name, "target": s.target}
    return Stage(f"score {name} {s.target}", kind, args, d, parent=parent, meta=meta)


def run_stages(stages: Sequence[Stage], rerun_changed: bool, say: Callable[[str], None]) -> None:
    """Every stage not done with its current config; refuses changed ones before running any."""
    import time

    inputs, stale = check_stages(list(stages), rerun_changed)
    stale_names = {s.name for s in stale}
    for i, stage in enumerate(stages, 1):
        t0 = time.perf_counter()
        what = run_stage(stage, inputs.get(stage.name), stage.name in stale_names)
        say(f"[proxy {i}/{len(stages)}] {stage.name}: {what} ({time.perf_counter() - t0:.0f}s)")


def read_scores(stage: Stage, s: Scorer) -> tuple[float, float]:
    """In-domain and general validation loss a score stage logged (its last values)."""
    logs = stage.directory  # validate writes into the --trainer.default_root_dir it is given
    scalars = last_scalars(logs)
    out = []
    for name in (s.domain, s.general):
        tag = f"val/{name}/loss"
        if tag not in scalars:
            raise MidtrainError(f"{logs}: no {tag!r} was logged; does the SFT config validate it?")
        out.append(scalars[tag])
    return out[0], out[1]


@dataclass
class Measured:
    """A proxy's losses for one target and its gains over the control from its checkpoint."""

    in_domain: float
    general: float
    control_in_domain: float
    control_general: float
    factor: float  # (T - S) / N: the proxy's steps scaled to a full branch's

    @property
    def predictors(self) -> dict[str, float]:
        gain = (self.control_in_domain - self.in_domain) / self.control_in_domain
        keep = (self.control_general - self.general) / self.control_general
        return {
            "proxy": gain,
            "proxy_seen": gain * self.factor,
            "proxy_retention": keep * self.factor,
        }


def measure_proxies(
    proxies: Sequence[Proxy],
    scorers: Sequence[Scorer],
    stages: Sequence[Stage],
    steps: int,
    max_steps: int,
) -> dict[tuple[str, str], Measured]:
    """(proxy name, target) -> its measurement, against the control of its start step."""
    by_name = {s.name: s for s in stages}
    losses = {
        (p.name, s.target): read_scores(by_name[f"score {p.name} {s.target}"], s)
        for p in proxies
        for s in scorers
    }
    controls = {p.start: p.name for p in proxies if p.control}
    out = {}
    for p in proxies:
        for s in scorers:
            ind, gen = losses[(p.name, s.target)]
            c_ind, c_gen = losses[(controls[p.start], s.target)]
            out[(p.name, s.target)] = Measured(
                ind, gen, c_ind, c_gen, (max_steps - p.start) / steps
            )
    return out


def control_name(start: int) -> str:
    return f"control-s{start}"


def with_controls(proxies: Sequence[Proxy]) -> list[Proxy]:
    """A control per start step first (the run's own mixture from the same checkpoint)."""
    starts = dict.fromkeys((p.start, p.checkpoint) for p in proxies)
    return [Proxy(control_name(s), s, c) for s, c in starts] + [p for p in proxies if not p.control]


def soup_rows(
    measured: Mapping[tuple[str, str], Measured], proxies: Sequence[Proxy], target: str, k: int
) -> list[Proxy]:
    """The k best proxies for a target by measured gain, from the start step of the best one
    (a soup averages anneals of one checkpoint, as OLMo's recipe does)."""
    ranked = sorted(
        (p for p in proxies if not p.control),
        key=lambda p: -measured[(p.name, target)].predictors["proxy"],
    )
    if not ranked:
        return []
    return [p for p in ranked if p.start == ranked[0].start][:k]
