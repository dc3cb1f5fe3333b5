"""A study's config (the ``midtrain experiment`` YAML) and what it derives from the fit configs
it names: the resolved pretraining config and the branches' mixtures."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from midtrain.configs import resolve_config
from midtrain.data.mixture import check_ramp
from midtrain.errors import MidtrainError

if TYPE_CHECKING:
    from midtrain.data.datamodule import MixtureDataModule


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
    # name -> {grid: {domain, start: [steps], weight: [weights], ramp_steps: [steps], ramp}}
    # or {switch: {step, weights}}
    branches: dict[str, dict[str, Any]] = field(default_factory=dict)
    prepare: list[str] = field(default_factory=list)
    similarity_docs: int = 200
    similarity_top_k: int = 1000


def config_files(files: list[str], where: str) -> list[str]:
    """Config paths as given or, when absent, the shipped config of that name."""
    out = []
    for f in files:
        path = resolve_config(f)
        if not path.is_file():
            raise MidtrainError(f"{where}: config file not found: {f}")
        out.append(str(path))
    return out


def check(cfg: ExperimentConfig) -> None:
    """One-line errors for a study that cannot be planned; touches nothing on disk."""
    config_files(cfg.pretrain.config, "pretrain.config")
    config_files(cfg.sft.config, "sft.config")
    config_files(cfg.prepare, "prepare")
    if not cfg.sft.targets:
        raise MidtrainError("sft.targets: name at least one SFT target")
    for target, data in cfg.sft.targets.items():
        if not isinstance(data, dict) or "target" not in data:
            raise MidtrainError(f"sft.targets.{target}: give `target`, the SFT domain")
    if not cfg.sft.lrs or not cfg.sft.seeds:
        raise MidtrainError("sft.lrs and sft.seeds need at least one value each")
    # the branches' shape now, before the fit config is resolved (steps vs max_steps: later)
    expand_branches(cfg, {cfg.general: 1.0})


def fit_args(files: list[str], args: list[str], where: str) -> list[str]:
    """The ``midtrain fit`` arguments of stacked config files plus extra arguments."""
    return [a for c in config_files(files, where) for a in ("--config", c)] + list(args)


def resolved_fit_config(args: list[str]) -> dict[str, Any]:
    """The config ``midtrain fit <args>`` would run with, as the fit command itself resolves it
    (``--print_config``: files stacked, overrides and defaults applied, nothing instantiated)."""
    proc = subprocess.run(
        [sys.executable, "-m", "midtrain", "fit", *args, "--print_config"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()] or ["(no output)"]
        raise MidtrainError(f"pretrain: `midtrain fit` refuses the config: {lines[-1].strip()}")
    return yaml.safe_load(proc.stdout)


def world_size(trainer: dict[str, Any]) -> int | None:
    """Processes of a trainer config, or None when only the hardware decides (``auto``, -1)."""
    devices, nodes = trainer.get("devices", "auto"), int(trainer.get("num_nodes") or 1)
    if isinstance(devices, list):
        return len(devices) * nodes
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if trainer.get("accelerator") == "cpu":
        return nodes
    return None


@dataclass
class FitSettings:
    """What the study reads of a resolved fit config with a ``MixtureDataModule``."""

    store: str
    weights: dict[str, float] | None  # None: every domain by its training tokens
    seq_len: int
    seed: int
    max_steps: int
    micro_batch_size: int
    accumulation: int
    world_size: int | None

    @classmethod
    def of(cls, resolved: dict[str, Any]) -> FitSettings:
        data, trainer = resolved.get("data") or {}, resolved.get("trainer") or {}
        init = data.get("init_args") or {}
        if "store" not in init or "seq_len" not in init:
            raise MidtrainError("pretrain: the fit config needs `data: midtrain.MixtureDataModule`")
        if not isinstance(trainer.get("max_steps"), int) or trainer["max_steps"] <= 0:
            raise MidtrainError("pretrain: give trainer.max_steps (the study schedules by steps)")
        weights = init.get("weights")
        return cls(
            store=str(init["store"]),
            weights=None if weights is None else {str(k): float(v) for k, v in weights.items()},
            seq_len=int(init["seq_len"]),
            seed=int(init.get("seed") or 0),
            max_steps=int(trainer["max_steps"]),
            micro_batch_size=int(init["micro_batch_size"]),
            accumulation=int(trainer.get("accumulate_grad_batches") or 1),
            world_size=world_size(trainer),
        )

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.accumulation * (self.world_size or 1)


def _fmt(x: float) -> str:
    return f"{x:g}"


GRID_KEYS = {"domain", "start", "weight"}  # required; `ramp_steps` and `ramp` are optional


def _values(g: dict[str, Any], key: str, where: str, what: str) -> list[Any]:
    """A grid axis: a non-empty list without repeats (a repeat would name two runs alike)."""
    values = g.get(key)
    if not isinstance(values, list) or not values:
        raise MidtrainError(f"{where}.{key}: give a non-empty list of {what}")
    if len(set(values)) != len(values):
        raise MidtrainError(f"{where}.{key}: {values} repeats a value")
    return values


def _step(value: Any, key: str, max_steps: int | None) -> int:
    """A switch step of the pretraining run: 0 < step < trainer.max_steps."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MidtrainError(f"{key}: {value!r} is not an optimizer step > 0")
    if max_steps is not None and value >= max_steps:
        raise MidtrainError(
            f"{key}: step {value} is not before the pretraining run's end "
            f"(trainer.max_steps={max_steps}); give a step below it"
        )
    return value


def check_grid(g: Any, where: str, max_steps: int | None) -> tuple[list, list, list, str]:
    """One-line errors for a grid; its start steps, weights, ramp lengths and ramp shape."""
    if (
        not isinstance(g, dict)
        or not set(g) >= GRID_KEYS
        or set(g) - GRID_KEYS - {"ramp_steps", "ramp"}
    ):
        raise MidtrainError(
            f"{where}: give `domain`, `start` (steps), `weight` and optionally `ramp_steps`, `ramp`"
        )
    starts = [_step(s, f"{where}.start", max_steps) for s in _values(g, "start", where, "steps")]
    weights = []
    for w in _values(g, "weight", where, "weights in (0, 1]"):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < float(w) <= 1:
            raise MidtrainError(f"{where}.weight: {w} is not in (0, 1]")
        weights.append(float(w))
    ramps = _values(g, "ramp_steps", where, "ramp lengths (steps)") if "ramp_steps" in g else [0]
    ramp = g.get("ramp", "linear")
    for r in ramps:
        check_ramp(r, ramp, where)
        if max_steps is not None and max(starts) + r > max_steps:
            raise MidtrainError(
                f"{where}.ramp_steps: a ramp of {r} steps from start step {max(starts)} runs past "
                f"trainer.max_steps={max_steps}; shorten it to at most {max_steps - max(starts)}"
            )
    return starts, weights, ramps, ramp


def grid_name(name: str, start: int, weight: float, ramp_steps: int) -> str:
    """A grid point's branch name: ``<grid>-s<start>-w<weight>``, ``-r<ramp steps>`` when it
    ramps (a jump keeps the name it had before ramps existed, so old studies resume)."""
    return f"{name}-s{start}-w{_fmt(weight)}" + (f"-r{ramp_steps}" if ramp_steps else "")


def expand_grid(
    name: str, g: Any, base: dict[str, float], max_steps: int | None = None
) -> dict[str, dict[str, Any]]:
    """The grid's points, start step x weight x ramp length in that order, each a branch: its
    domain at weight w, the pretraining mixture ``base`` scaled by (1 - w)."""
    where = f"branches.{name}.grid"
    starts, weights, ramps, ramp = check_grid(g, where, max_steps)
    total = sum(base.values())
    out = {}
    for start, w, r in itertools.product(starts, weights, ramps):
        mix = {d: round(v / total * (1 - w), 10) for d, v in base.items() if w < 1}
        mix[g["domain"]] = round(mix.get(g["domain"], 0.0) + w, 10)
        point = {"step": start, "weights": mix, "domain": g["domain"], "grid": name, "weight": w}
        if r:
            point.update(ramp_steps=r, ramp=ramp)
        out[grid_name(name, start, w, r)] = point
    return out


def expand_branches(
    cfg: ExperimentConfig, base: dict[str, float], max_steps: int | None = None
) -> dict[str, dict[str, Any]]:
    """Branch name -> {step, weights, domain} (the baseline has no switch); a grid point also
    has ``grid``, ``weight`` and, when it ramps, ``ramp_steps`` and ``ramp``. Steps are checked
    against ``max_steps`` (the pretraining run's) when given."""
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
            out[name] = {
                "step": _step(sw["step"], f"{where}.switch.step", max_steps),
                "weights": weights,
                "domain": max(weights, key=weights.__getitem__),
            }
            continue
        for point, spec in expand_grid(name, b["grid"], base, max_steps).items():
            if point in out:
                raise MidtrainError(f"{where}: its point {point} is also another branch's name")
            out[point] = spec
    return out


def pretraining_data(settings: FitSettings) -> MixtureDataModule | None:
    """The baseline's ``MixtureDataModule`` as its fit run builds it (no trainer, no loaders),
    or None when the store is not prepared yet (a dry run before the prepare stages)."""
    from midtrain.data.store import StoreIndex

    if not StoreIndex.exists(settings.store):
        return None
    from midtrain.data.datamodule import MixtureDataModule

    return MixtureDataModule(
        settings.store,
        weights=settings.weights,
        seq_len=settings.seq_len,
        micro_batch_size=settings.micro_batch_size,
        seed=settings.seed,
        val_sets=[],
        max_repeat=None,
    )


def pretraining_weights(settings: FitSettings) -> dict[str, float]:
    """The baseline's configured mixture: ``data.weights`` or, unset, the data module's default
    (every domain by its training tokens), which needs the prepared store."""
    if settings.weights is not None:
        return settings.weights
    data = pretraining_data(settings)
    if data is None:
        raise MidtrainError(
            f"pretrain: data.weights is unset and the store {settings.store} is not prepared, "
            "so the pretraining mixture is unknown; give data.weights or prepare the store"
        )
    return dict(data.weights)
