"""The one place where midtrain touches Lightning internals (written against lightning 2.6.x;
the ``min`` tox env pins 2.6.0, CI also runs the newest release).

Everything else in midtrain uses Lightning's public API only. Each function here names the
internal it relies on and why no public API does the job; when Lightning changes, this module
is the one to update.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ThroughputMonitor


def throughput_metrics(monitor: ThroughputMonitor, trainer: pl.Trainer) -> dict[str, float]:
    """The current window of a ``ThroughputMonitor`` for the running stage (host-side numbers,
    no device sync). Lightning keeps its per-stage ``Throughput`` objects in ``_throughputs``
    and offers no accessor."""
    stage = trainer.state.stage
    throughput = monitor._throughputs.get(stage) if stage is not None else None
    return throughput.compute() if throughput is not None else {}


def checkpoint_datamodule_state(checkpoint: dict[str, Any],
                                datamodule: pl.LightningDataModule) -> dict[str, Any] | None:
    """The data module's ``state_dict`` inside a checkpoint: Lightning's checkpoint connector
    stores it under the class's ``__qualname__`` (read before fit, to refuse a resume before
    Lightning writes anything)."""
    return checkpoint.get(type(datamodule).__qualname__)


def set_run_argument(cli: Any, subcommand: str, name: str, value: Any) -> None:
    """Change an argument of the trainer method LightningCLI is about to call (e.g. ``fit``'s
    ``ckpt_path`` for ``--fork``): LightningCLI reads them from ``config_init[subcommand]``
    and has no hook to change them after parsing."""
    cli.config_init[subcommand][name] = value
