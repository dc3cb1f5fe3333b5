"""The one place where midtrain touches Lightning internals (written against lightning 2.6.x;
the ``min`` tox env pins 2.6.0, CI also runs the newest release).

Everything else in midtrain uses Lightning's public API only. Each function here names the
internal it relies on and why no public API does the job; when Lightning changes, this module
is the one to update.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


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
