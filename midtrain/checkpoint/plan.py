"""Run state in one home: what each command does with a checkpoint, decided by one planner.

Every stateful part of a run (``CausalLM`` with its optimizer and LR schedule, the data module,
each callback that keeps state) implements ``RunPart``: ``run_settings`` declares, by config
key, the settings that shaped its state, each with a ``Rule`` saying what a resume and a fork
may change, and whether reading the checkpoint's weights needs it (validate, test, export);
``check_plan`` refuses what the part cannot do for a command. Nothing else is declared anywhere:
a new optimizer setting or callback setting is refused on a changed resume without a change
here.

A command's ``RunPlan`` says what it starts from: nothing (``new``), a checkpoint to continue
(``resume``), a checkpoint to branch from (``fork``) or trained weights to look at
(``evaluate``: validate, test, predict). The CLI builds one plan, checks it with ``check_start``
and ``check_checkpoint`` before anything is written, and hands it to the trainer
(``Trainer.run_plan``); each part reads it with ``plan_of(trainer)`` when Lightning restores
it, and restores only what the command needs. Runs started from Python get the same checks
when ``CausalLM`` is restored (``check_restore``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from midtrain.checkpoint.files import averaged_state
from midtrain.checkpoint.load import AVERAGED_FROM, weights_record
from midtrain.data.mixture import describe_schedule
from midtrain.errors import MidtrainError
from midtrain.run_state import Fork, Rule, RunPart, RunPlan, Setting, plan_of

__all__ = [
    "Fork",
    "Rule",
    "RunPart",
    "RunPlan",
    "Setting",
    "check_checkpoint",
    "check_restore",
    "check_start",
    "plan_of",
    "record",
    "record_of",
]

if TYPE_CHECKING:
    import lightning.pytorch as pl

# -- the record every checkpoint carries ---------------------------------------------------------


def parts_of(
    model: object, datamodule: object, callbacks: Iterable[object]
) -> list[tuple[str | None, RunPart]]:
    """The run's stateful parts, as (callback display name or None, part): data module, model,
    then callbacks in order (the order ``check_start`` asks them in)."""
    parts: list[tuple[str | None, RunPart]] = []
    for obj in (datamodule, model):
        if isinstance(obj, RunPart):
            parts.append((None, obj))
    for cb in callbacks:
        if isinstance(cb, RunPart):
            parts.append((_display_name(cb), cb))
    return parts


def _display_name(cb: object) -> str:
    """A callback as users name it (``midtrain.callbacks.EMA``)."""
    cls = type(cb)
    if cls.__module__.startswith("midtrain."):
        return f"midtrain.callbacks.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def trainer_settings(trainer: pl.Trainer) -> dict[str, Setting]:
    """What the trainer's own arguments contribute to a run's record."""
    return {
        "trainer.max_steps": Setting(trainer.max_steps),
        "trainer.accumulate_grad_batches": Setting(trainer.accumulate_grad_batches, Rule.ELASTIC),
        "world size": Setting(trainer.world_size, Rule.ELASTIC),
    }


def run_settings(
    parts: list[tuple[str | None, RunPart]], trainer: pl.Trainer
) -> dict[str, Setting]:
    """Every part's settings, and the trainer's."""
    settings = trainer_settings(trainer)
    for _, part in parts:
        settings.update(part.run_settings(trainer))
    return settings


def record(parts: list[tuple[str | None, RunPart]], trainer: pl.Trainer) -> dict[str, Any]:
    """The run record saved in every checkpoint (``checkpoint["midtrain"]["run"]``): each
    setting's value by key, and under ``parts`` the callbacks that hold state (by key prefix)."""
    out: dict[str, Any] = {k: s.value for k, s in trainer_settings(trainer).items()}
    named = {}
    for name, part in parts:
        settings = part.run_settings(trainer)
        out.update({k: s.value for k, s in settings.items()})
        if name is not None:
            named.update({key.split(".")[0]: name for key in settings})
    out["parts"] = named
    return out


def record_of(trainer: pl.Trainer) -> dict[str, Any]:
    """The record of the run a trainer is running (``CausalLM.on_save_checkpoint`` saves it)."""
    return record(_trainer_parts(trainer), trainer)


def _trainer_parts(trainer: pl.Trainer) -> list[tuple[str | None, RunPart]]:
    return parts_of(
        trainer.lightning_module,
        getattr(trainer, "datamodule", None),
        getattr(trainer, "callbacks", []),
    )


# -- the checks ----------------------------------------------------------------------------------


def check_start(
    plan: RunPlan, parts: list[tuple[str | None, RunPart]], trainer: pl.Trainer
) -> None:
    """Each part's own refusals for this command (data module first: its schedule is whole
    before a callback reads it)."""
    for _, part in parts:
        part.check_plan(plan, trainer)


def _differences(
    saved: Mapping[str, Any], now: Mapping[str, Setting], fork_step: int | None
) -> tuple[list[str], list[str]]:
    """(setting differences as ``key old -> new``, keys of differing schedules) between a
    record and this run's settings: all that a resume keeps, or, for a fork from
    ``fork_step``, what a fork keeps."""
    changed, schedules = [], []
    for key, setting in now.items():
        if key not in saved or setting.rule in (Rule.ELASTIC, Rule.RECORD):
            continue
        old, new = saved[key], setting.value
        if setting.rule is Rule.SCHEDULE:
            if _entries(old, fork_step) != _entries(new, fork_step):
                schedules.append(key)
        elif old != new and (fork_step is None or setting.rule is Rule.PAST):
            changed.append(_changed(key, old, new, saved.get("parts") or {}))
    return changed, schedules


def _changed(key: str, old: Any, new: Any, parts: Mapping[str, str] | None = None) -> str:
    """``key old -> new``; a callback's setting as ``key: the checkpoint's <callback> had ...``."""
    part = key.split(".")[0]
    if part in (parts or {}):
        return f"{key}: the checkpoint's {part} had {old!r}, this run has {new!r}"
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        return ", ".join(f"{key}.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
    return f"{key} {old!r} -> {new!r}"


def _entries(schedule: Any, before: int | None = None) -> list[tuple[Any, ...]]:
    """A schedule's entries as tuples (a checkpoint holds lists), those before ``before``."""
    return [tuple(x) for x in schedule or [] if before is None or x[0] < before]


def _missing_parts(saved: Mapping[str, Any], now: Mapping[str, Setting]) -> list[tuple[str, str]]:
    """Callbacks whose state the checkpoint holds and this run lacks: (key prefix, name)."""
    present = {k.split(".")[0] for k in now}
    named = saved.get("parts") or {}
    return [(prefix, name) for prefix, name in named.items() if prefix not in present]


def check_record(plan: RunPlan, saved: Mapping[str, Any], now: Mapping[str, Setting]) -> None:
    """Refuse, in one line, a checkpoint whose record this plan cannot honour: a resume that
    would not continue the run exactly, or a fork that would change the past."""
    where, fork = plan.where, plan.fork is not None
    changed, schedules = _differences(saved, now, plan.fork.step if plan.fork else None)
    if schedules and fork:
        assert plan.fork is not None
        raise MidtrainError(
            f"fork: the schedule before the fork point (step {plan.fork.step}) differs from the "
            f"checkpoint's ({', '.join(schedules)}); a fork may only change phases from the fork "
            "step on"
        )
    if schedules:
        key = schedules[0]
        raise MidtrainError(
            f"{key}: the checkpoint was trained with a different mixture schedule (the "
            f"checkpoint's: {describe_schedule(_entries(saved[key]))}; this run's: "
            f"{describe_schedule(_entries(now[key].value))}); to continue with a new schedule, "
            "start a new run with `midtrain fit --fork <ckpt>`"
        )
    if changed:
        hint = (
            "a fork may change the optimizer settings, max_steps and the schedule from the fork "
            "step on, not the past"
            if fork
            else "resume with the checkpoint's settings, or start a new run from it with --fork"
        )
        raise MidtrainError(
            f"{where}: it was trained with another setup: {'; '.join(changed)}; {hint}"
        )
    if not fork and (missing := _missing_parts(saved, now)):
        prefix, name = missing[0]
        kept = {k: v for k, v in saved.items() if k.split(".")[0] == prefix}
        raise MidtrainError(
            f"{where}: it holds the state of {name} ({_changed_list(kept)}) but this run has no "
            f"{name}; resume with the same callback, or start a new run from it with --fork"
        )


def _changed_list(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v!r}" for k, v in settings.items())


def check_fork_options(
    saved: Mapping[str, Any] | None, plan: RunPlan, options: Mapping[str, str]
) -> None:
    """A resume given ``--fork_*`` options (a branch's saved config holds them): each must be
    what the run was forked with (``saved``: the ``fork`` of its run record)."""
    for key, value in options.items():
        was = (saved or {}).get(key.removeprefix("fork_"))
        if was is None:
            raise MidtrainError(
                f"{key}: {value} is an option of a fork, and {plan.where} continues a run that "
                f"was not forked; drop --{key}, or start a new run from it with --fork"
            )
        if was != value:
            raise MidtrainError(
                f"{key}: {value}, but {plan.where} continues a run forked with {key} {was}; a "
                f"resume continues its run as it was started: drop --{key}"
            )


def check_weights_shape(
    plan: RunPlan, saved: Mapping[str, Any], now: Mapping[str, Setting]
) -> None:
    """Reading a checkpoint's weights (validate, test, predict) needs the settings that shape
    them (``Setting.weights``) equal to this run's; one line naming the difference."""
    changed = [
        _changed(key, saved[key], s.value)
        for key, s in now.items()
        if s.weights and key in saved and saved[key] != s.value
    ]
    if changed:
        raise MidtrainError(
            f"{plan.where}: its model is not this config's ({'; '.join(changed)}); evaluate it "
            "with its own run's config.yaml, or set the model to the one it was trained as"
        )


def check_training_state(plan: RunPlan, metadata: Mapping[str, Any]) -> None:
    """A resume or a fork continues a run's training state (loops, optimizer, data position); a
    weights-only checkpoint (a soup of ``midtrain average``) has none: it starts a new run."""
    if "loops" in metadata:
        return
    what = "a soup written by midtrain average" if AVERAGED_FROM in metadata else "weights only"
    raise MidtrainError(
        f"{plan.where}: it holds no training state to continue ({what}); start a new run from "
        f"its weights with --model.init_from {plan.checkpoint}"
    )


def check_checkpoint(
    plan: RunPlan,
    metadata: Mapping[str, Any],
    parts: list[tuple[str | None, RunPart]],
    trainer: pl.Trainer,
) -> None:
    """Everything a command must refuse about its checkpoint, once per plan and checkpoint:
    for evaluation, that it holds the weights asked for and that they fit this model; for a
    resume or a fork, that it holds a run's training state and its record against this run's
    settings."""
    if plan.checkpoint is None or plan.checkpoint in plan.checked:
        return
    saved = (metadata.get("midtrain") or {}).get("run")
    now = run_settings(parts, trainer)
    if plan.mode == "evaluate":
        if plan.weights == "ema":
            averaged_state(dict(metadata), plan.checkpoint)
        check_weights_shape(plan, saved if saved is not None else weights_record(metadata), now)
    else:
        check_training_state(plan, metadata)
        if saved is not None:
            check_record(plan, saved, now)
    plan.checked.add(plan.checkpoint)


def check_restore(trainer: pl.Trainer, checkpoint: Mapping[str, Any]) -> RunPlan:
    """The plan of the running command, checked against the checkpoint Lightning is restoring
    (a no-op when the CLI checked it before anything was written)."""
    plan = plan_of(trainer)
    if plan.checkpoint is None and trainer.ckpt_path:
        plan.checkpoint = str(trainer.ckpt_path)
    parts = _trainer_parts(trainer)
    check_checkpoint(plan, checkpoint, parts, trainer)
    return plan
