"""The vocabulary of run state, below every layer: a command's ``RunPlan`` (what it starts
from), ``Fork``, and how a stateful part declares its settings (``Setting``, ``Rule``,
``RunPart``). The data module, the model and the callbacks implement ``RunPart``; the planner
that applies the rules is ``midtrain.checkpoint.plan``."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from midtrain.errors import MidtrainError

if TYPE_CHECKING:
    import lightning.pytorch as pl

COMMANDS = ("fit", "validate", "test", "predict")
FORK_OPTIMIZER = ("keep", "reset")
FORK_DATA = ("keep", "fresh")


class Rule(str, Enum):
    """What a resume and a fork may change of a setting."""

    PAST = "past"  # shaped what the checkpoint holds: a resume and a fork keep it
    RESUME = "resume"  # a resume keeps it; a fork may change it (the default)
    SCHEDULE = "schedule"  # [(start step, ...), ...]: a resume keeps all, a fork those before it
    ELASTIC = "elastic"  # recorded; a resume may change it (how the global batch is split)
    RECORD = "record"  # how the run started (--fork); restated only through --fork_* options


@dataclass(frozen=True)
class Setting:
    """One setting of a part: its value, its ``Rule``, and whether a command that reads the
    checkpoint's weights (validate, test, export, average, init_from) needs it equal."""

    value: Any
    rule: Rule = Rule.RESUME
    weights: bool = False


@dataclass(frozen=True)
class Fork:
    """``midtrain fit --fork``: branch from the checkpoint of optimizer step ``step``, keeping or
    resetting its optimizer state and keeping or restarting its data stream."""

    step: int
    optimizer: str = "keep"
    data: str = "keep"

    def __post_init__(self) -> None:
        if self.optimizer not in FORK_OPTIMIZER:
            raise MidtrainError(
                f"fork_optimizer: {self.optimizer!r}; use one of {', '.join(FORK_OPTIMIZER)}"
            )
        if self.data not in FORK_DATA:
            raise MidtrainError(f"fork_data: {self.data!r}; use one of {', '.join(FORK_DATA)}")

    def record(self) -> dict[str, Any]:
        """As the run record keeps it (``fork`` of every checkpoint of the branch)."""
        return {"step": self.step, "optimizer": self.optimizer, "data": self.data}


@dataclass
class RunPlan:
    """What one command does with a checkpoint.

    command: ``fit``, ``validate``, ``test`` or ``predict``.
    checkpoint: the checkpoint it reads (``ckpt_path``, or the fork's), None for a new run.
    fork: set for ``midtrain fit --fork``.
    weights: which weights of a checkpoint are read: ``live``, or ``ema`` (the average kept by
        ``midtrain.callbacks.EMA``) for validate/test, and for fit the ``model.init_from``
        checkpoint's.
    """

    command: str = "fit"
    checkpoint: str | None = None
    fork: Fork | None = None
    weights: str = "live"
    checked: set[str] = field(default_factory=set)  # checkpoints already checked for this plan

    @property
    def mode(self) -> str:
        """``new``, ``resume``, ``fork`` or ``evaluate``."""
        if self.command != "fit":
            return "evaluate"
        if self.fork is not None:
            return "fork"
        return "resume" if self.checkpoint else "new"

    @property
    def where(self) -> str:
        """How the command line named the checkpoint, for messages."""
        return f"{'--fork' if self.fork is not None else '--ckpt_path'} {self.checkpoint}"


@runtime_checkable
class RunPart(Protocol):
    """A stateful part of a run (model, data module, callback)."""

    def run_settings(self, trainer: pl.Trainer) -> dict[str, Setting]:
        """The settings that shaped this part's state, by config key (``model.lr``,
        ``data.seq_len``, ``EMA.decay``); a callback's keys start with its class name."""
        ...

    def check_plan(self, plan: RunPlan, trainer: pl.Trainer) -> None:
        """Refuse, in one line, what this part cannot do for the plan's command."""
        ...


def plan_of(trainer: pl.Trainer | None) -> RunPlan:
    """The plan of the command the trainer runs: the one handed over (``Trainer.run_plan``,
    set by the CLI or ``Trainer.fork``) while it runs that command, else what Lightning's own
    arguments mean (``fit`` with ``ckpt_path``: a resume)."""
    if trainer is None:
        return RunPlan()
    fn = getattr(trainer.state.fn, "value", None) or "fit"
    plan = getattr(trainer, "run_plan", None)
    if isinstance(plan, RunPlan) and plan.command == fn:
        return plan
    ckpt = trainer.ckpt_path
    return RunPlan(command=fn, checkpoint=str(ckpt) if ckpt else None)
