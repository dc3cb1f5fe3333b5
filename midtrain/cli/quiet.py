"""The one place where Lightning's (and its dependencies') messages that say nothing true or
useful to a midtrain user are filtered. Called once by the ``midtrain`` command.

Everything else Lightning prints is kept: its warnings are often the only sign of a real mistake.
"""

from __future__ import annotations

import logging
import re
import warnings

# warnings.warn / rank_zero_warn messages (regular expressions matched at the start)
WARNINGS = [
    # Our training streams resume exactly by optimizer step (every micro-batch is a pure
    # function of its index, the start step comes from the restored global step), so this
    # warning states the opposite of the truth. A loader `state_dict` would silence it too,
    # but would also switch Lightning to its own loader-restoring path.
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader "
    r"is not resumable",
    # Our streams shard by rank and worker themselves, so the length caveat does not apply.
    r".*`IterableDataset` has `__len__` defined",
    # A deprecation inside Lightning's own use of torch's pytree; nothing a user can change.
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Resuming or extending a run writes into its own checkpoint directory, by design.
    r"Checkpoint directory .* exists and is not empty",
]

# Only when evaluating (validate/test/predict), where only the weights of a checkpoint matter:
EVALUATION_WARNINGS = [
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be",
    r"The dirpath has changed from .* won't be reloaded",
]

# Only for `fit --fork`: a fork is a new run with its own callbacks (another checkpoint
# cadence, a MixtureSwitch); the forked run's callback states are meant to be left behind.
FORK_WARNINGS = [
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be",
]

# rank_zero_info lines (matched at the start); "already configured with model summary": the
# Trainer installs midtrain's own summary (midtrain.train.summary_table), by design.
INFO = re.compile(
    r"💡 Tip: |GPU available: |TPU available: |HPU available: "
    r"|Trainer already configured with model summary callbacks"
)


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not INFO.match(record.getMessage())


def quiet_lightning(command: str = "fit", fork: bool = False) -> None:
    """Install the filters for a ``midtrain`` command (idempotent); ``fork``: ``fit --fork``."""
    evaluating = command in ("validate", "test", "predict")
    messages = WARNINGS + (EVALUATION_WARNINGS if evaluating else [])
    for message in messages + (FORK_WARNINGS if fork else []):
        warnings.filterwarnings("ignore", message=message)
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning_utilities.core.rank_zero",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropInfo) for f in logger.filters):
            logger.addFilter(_DropInfo())
