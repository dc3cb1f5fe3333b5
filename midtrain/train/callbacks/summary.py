"""``RunSummary``: the few lines a researcher reads at the end of ``fit``, ``validate`` and
``test`` (also after a preemption or a divergence stop), and the same as ``<run>/summary.json``.

The callback only gathers values from the run itself (``CausalLM.tokens_seen``,
``trainer.callback_metrics``, the run's files); ``summary_lines`` turns them into text and is a
pure function, so what is shown is tested without a run."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import Callback

from midtrain.checkpoint.layout import LAST, checkpoint_dir

SUMMARY_FILE = "summary.json"


def summary_file(command: str) -> str:
    """``summary.json`` for fit; evaluation's own name, so that an evaluation logging into the
    run directory never replaces the run's summary."""
    return SUMMARY_FILE if command == "fit" else f"{command}-{SUMMARY_FILE}"


@dataclass
class Summary:
    """What one ``fit``/``validate``/``test`` ended with; ``status``: ``finished``,
    ``preempted``, ``diverged`` or ``interrupted`` (Ctrl-C)."""

    command: str
    status: str
    step: int
    max_steps: int
    wall_seconds: float
    run_dir: str
    log_dir: str
    metrics: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    tokens_this_process: int = 0
    train_seconds: float = 0.0
    last_checkpoint: str | None = None
    config: str | None = None
    forked: bool = False
    reason: str = ""

    @property
    def tokens_per_second(self) -> float | None:
        if self.train_seconds <= 0 or not self.tokens_this_process:
            return None
        return self.tokens_this_process / self.train_seconds


def format_value(value: float) -> str:
    """A loss as shown: 4 decimals; a non-finite value is never shown as a number."""
    return f"{value:.4f}" if math.isfinite(value) else f"{value} (diverged)"


def format_duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    h, rest = divmod(s, 3600)
    return f"{h}h {rest // 60:02d}m" if h else f"{s // 60}m {s % 60:02d}s"


def format_count(n: float) -> str:
    """1,234 below a million, 12.3M above (tokens)."""
    if abs(n) < 1e6:
        return f"{n:,.0f}"
    return f"{n / 1e9:.2f}B" if abs(n) >= 1e9 else f"{n / 1e6:.1f}M"


def losses_line(metrics: dict[str, float], stage: str) -> str | None:
    """``train/loss 3.21 | val/prose/loss 3.40 | ...``: the final loss of each set, then of
    the averaged weights' (``val_ema/<set>/loss``, midtrain.callbacks.EMA) where validated."""
    keys = [k for k in metrics if k == "train/loss"]
    for family in (stage, f"{stage}_ema"):
        keys += sorted(k for k in metrics if k.startswith(f"{family}/") and k.endswith("/loss"))
    if not keys:
        return None
    return "  ".join(f"{k} {format_value(metrics[k])}" for k in keys)


def tokens_line(tokens: dict[str, int]) -> str | None:
    if not tokens:
        return None
    per_domain = "  ".join(f"{d} {format_count(n)}" for d, n in tokens.items())
    return f"{per_domain}  (total {format_count(sum(tokens.values()))})"


def _status_line(s: Summary) -> str:
    took = format_duration(s.wall_seconds)
    if s.command != "fit":
        return f"{s.command}: done in {took}"
    rate = s.tokens_per_second
    speed = f", {format_count(rate)} tokens/s" if rate is not None else ""
    where = f"at step {s.step}/{s.max_steps}" if s.max_steps > 0 else f"at step {s.step}"
    what = {"finished": "finished", "preempted": "preempted", "diverged": "stopped (diverged)"}
    line = f"fit: {what.get(s.status, s.status)} {where} in {took}{speed}"
    return line + (f": {s.reason}" if s.reason and s.status != "finished" else "")


def _fit_config(s: Summary) -> str:
    return f"--config {s.config}" if s.config else "--config <your config>"


def next_commands(s: Summary) -> list[tuple[str, str]]:
    """What to run next, with this run's own paths, as (label, command)."""
    if s.command != "fit":
        return [("watch", f"tensorboard --logdir {s.log_dir}")]
    config, last = _fit_config(s), s.last_checkpoint
    if s.status in ("preempted", "interrupted") and last:
        fork = " --fork null" if s.forked else ""  # the resumed run is this run, not a new fork
        return [("resume", f"midtrain fit {config}{fork} --ckpt_path last")]
    if s.status == "diverged":
        if not last:
            return [("restart", "no checkpoint was kept: lower model.lr and start again")]
        new = f"--trainer.default_root_dir {s.run_dir}-fork"
        return [("continue", f"midtrain fit {config} --fork {last} {new} --model.lr <lower>")]
    out = [("watch", f"tensorboard --logdir {s.run_dir}")]
    if last:
        # `--trainer.logger true`: evaluation logs into <run>/validate, not over the run's logs
        out += [
            ("evaluate", f"midtrain validate {config} --trainer.logger true --ckpt_path {last}"),
            ("export", f"midtrain export --ckpt {last} --out {s.run_dir}/hf"),
        ]
    return out


def summary_lines(s: Summary) -> list[str]:
    """The summary as printed (a status line, then indented details)."""
    stage = "val" if s.command in ("fit", "validate") else s.command
    details = [
        ("losses", losses_line(s.metrics, stage)),
        ("tokens", tokens_line(s.tokens) if s.command == "fit" else None),
        ("checkpoint", s.last_checkpoint),
        ("logs", s.log_dir),
        ("summary", str(Path(s.log_dir) / summary_file(s.command))),
    ]
    rows = [(k, v) for k, v in details if v] + next_commands(s)
    return [_status_line(s)] + [f"  {k + ':':<11} {v}" for k, v in rows]


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue  # a non-scalar metric has no place in a summary
    return out


def _json_safe(value: Any) -> Any:
    """NaN/inf as strings: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


class RunSummary(Callback):
    """Prints the run summary at the end of ``fit``/``validate``/``test`` (global rank 0 only)
    and writes it as ``summary.json`` into the logger's directory (the run directory for fit).

    Args:
        enabled: ``false`` prints and writes nothing.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._t0 = self._train_t0 = time.perf_counter()
        self._tokens_at_start = 0
        self._done = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._t0 = time.perf_counter()
        self._done = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after a resume's restore: the tokens this process trains on are counted from here
        self._tokens_at_start = sum(getattr(pl_module, "tokens_seen", {}).values())
        self._train_t0 = time.perf_counter()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        command = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        if command in ("fit", "validate", "test"):
            self.report(trainer, pl_module, command, "finished")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Only the stops a run is meant to survive; any other error is its own message, and a
        # refused input must leave nothing on disk.
        status = {"Preempted": "preempted", "Diverged": "diverged"}.get(type(exception).__name__)
        if isinstance(exception, KeyboardInterrupt):
            status = "interrupted"
        if status is None or trainer.state.fn is None:
            return
        reason = str(exception).split(";")[0].removeprefix("divergence: ")
        reason = reason if status == "diverged" else ""
        self.report(trainer, pl_module, trainer.state.fn.value, status, reason)

    def report(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        command: str,
        status: str,
        reason: str = "",
    ) -> Summary | None:
        """Gather, print and write the summary once per command (rank 0)."""
        if not self.enabled or self._done or not trainer.is_global_zero:
            return None
        self._done = True
        summary = self.gather(trainer, pl_module, command, status, reason)
        print("\n".join(summary_lines(summary)), file=sys.stderr, flush=True)
        path = Path(summary.log_dir) / summary_file(command)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(summary) | {"tokens_per_second": summary.tokens_per_second}
        path.write_text(json.dumps(_json_safe(data), indent=2) + "\n")
        return summary

    def gather(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        command: str,
        status: str,
        reason: str,
    ) -> Summary:
        run_dir = Path(trainer.default_root_dir)
        log_dir = _log_dir(trainer) or run_dir
        last = checkpoint_dir(trainer) / LAST
        tokens = dict(getattr(pl_module, "tokens_seen", {}))
        config = log_dir / "config.yaml" if command == "fit" else None
        return Summary(
            command=command,
            status=status,
            step=trainer.global_step,
            max_steps=trainer.max_steps,
            wall_seconds=time.perf_counter() - self._t0,
            run_dir=str(run_dir),
            log_dir=str(log_dir),
            metrics=_floats(dict(trainer.callback_metrics)),
            tokens=tokens,
            tokens_this_process=sum(tokens.values()) - self._tokens_at_start,
            train_seconds=time.perf_counter() - self._train_t0 if command == "fit" else 0.0,
            last_checkpoint=str(last) if command == "fit" and last.exists() else None,
            config=str(config) if config is not None and config.exists() else None,
            forked=_forked(config),
            reason=reason,
        )


def _log_dir(trainer: pl.Trainer) -> Path | None:
    """The logger's directory, read without a collective: ``Trainer.log_dir`` broadcasts from
    rank 0, and this runs on rank 0 alone (the other ranks would never join it)."""
    logger = trainer.logger
    if logger is None:
        return None
    directory = getattr(logger, "log_dir", None) or logger.save_dir  # as Lightning reads it
    return Path(directory) if directory else None


def _forked(config: Path | None) -> bool:
    """Whether the run's saved config started it with ``--fork``."""
    if config is None or not config.exists():
        return False
    saved = yaml.safe_load(config.read_text()) or {}
    return bool(saved.get("fork"))
