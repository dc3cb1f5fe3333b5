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
    # name -> {grid: {domain, start: [steps], weight: [weights]}} or {switch: {step, weights}}
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


def expand_branches(cfg: ExperimentConfig, base: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Branch name -> {step, weights, domain} (the baseline has no switch). A grid point mixes
    its domain in at weight w and scales the pretraining mixture ``base`` by (1 - w)."""
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
            out[name] = {
                "step": int(sw["step"]),
                "weights": weights,
                "domain": max(weights, key=weights.__getitem__),
            }
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
            out[f"{name}-s{start}-w{_fmt(w)}"] = {
                "step": int(start),
                "weights": weights,
                "domain": g["domain"],
            }
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
