"""``midtrain fit | validate | test | predict``: LightningCLI with midtrain's defaults, its
resume planning and its checks before anything is written.

The hooks only order the steps; what they decide lives in pure functions elsewhere
(``midtrain.checkpoint.resume.plan_resume`` / ``refuse_differences``,
``midtrain.checkpoint.layout.check_run_dir``, ``evaluation_defaults``, ``default_logger``)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.core.datamodule import LightningDataModule
from lightning.pytorch.plugins.environments import SLURMEnvironment

from midtrain.checkpoint.atomic import remove_stale_temps, use_atomic_checkpoints
from midtrain.checkpoint.files import averaged_state, check_weights_choice, read_metadata
from midtrain.checkpoint.layout import check_run_dir, run_checkpoints
from midtrain.checkpoint.resume import (
    ResumePlan,
    check_fork_options,
    plan_resume,
    refuse_differences,
    run_record,
)
from midtrain.cli.errors import translate_cli_error
from midtrain.data.contract import StepDataModule, fresh_data_unsupported, require_max_steps
from midtrain.data.datamodule import MixtureDataModule
from midtrain.errors import MidtrainError, recording_errors
from midtrain.train._lightning import (
    KeepConfigOnResume,
    checkpoint_datamodule_state,
    set_run_argument,
)
from midtrain.train.callbacks.adaptive import AdaptiveMixture
from midtrain.train.callbacks.checkpoints import ModelCheckpoint
from midtrain.train.callbacks.divergence import DivergenceGuard
from midtrain.train.callbacks.ema import EMA, check_ema_resume
from midtrain.train.callbacks.mixture import MixtureLogging, MixtureSwitch
from midtrain.train.callbacks.preemption import Preemption
from midtrain.train.callbacks.summary import RunSummary
from midtrain.train.callbacks.throughput import Throughput
from midtrain.train.module import CausalLM
from midtrain.train.optim import ANNEALS, anneal_without_checkpoint
from midtrain.train.trainer import Trainer

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_ROOT = "runs/midtrain"
FORK_OPTIONS = ("fork_optimizer", "fork_data")


def say(line: str) -> None:
    """A line for the user, on stderr (stdout may be a results table)."""
    print(line, file=sys.stderr, flush=True)


# -- pure pieces of the config hooks ------------------------------------------------------------


def evaluation_defaults(cfg: Namespace, subcommand: str) -> None:
    """validate/test evaluate trained weights, on the whole validation sets."""
    if subcommand not in ("validate", "test"):
        return
    if not (cfg.get("ckpt_path") or cfg.model.get("init_from")):
        raise MidtrainError(
            f"ckpt_path: `midtrain {subcommand}` evaluates trained weights; give "
            "--ckpt_path <checkpoint> (or `last` of the run), or --model.init_from "
            "<checkpoint>"
        )
    # `limit_val_batches: 0` in a fit config turns periodic validation off; the command whose
    # whole job is evaluation evaluates the whole sets.
    key = "limit_val_batches" if subcommand == "validate" else "limit_test_batches"
    if cfg.trainer.get(key) == 0:
        cfg.trainer[key] = 1.0


def trainer_defaults(trainer: Namespace, subcommand: str) -> None:
    """A run directory by default; ``max_steps`` must be set for fit (schedules are in steps)."""
    trainer.default_root_dir = trainer.default_root_dir or DEFAULT_ROOT
    if trainer.get("max_steps") is None:  # `--trainer.max_steps null`
        if subcommand == "fit":
            raise MidtrainError(
                "trainer.max_steps: null; set a positive number of optimizer "
                "steps (midtrain's schedules are in steps)"
            )
        trainer.max_steps = -1  # Lightning's "no limit"; evaluation does not use it


def check_slurm_tasks(trainer: Any) -> None:
    """Under ``srun``, Lightning takes the ranks from SLURM and needs ``--ntasks-per-node`` equal
    to ``trainer.devices``; said in one line here (Lightning raises with a traceback)."""
    if not SLURMEnvironment.detect():  # no srun, or a job named bash/interactive
        return
    ntasks, per_node = os.environ.get("SLURM_NTASKS", "1"), os.environ.get("SLURM_NTASKS_PER_NODE")
    devices = trainer.get("devices")
    if per_node is None and ntasks.isdigit() and int(ntasks) > 1:
        raise MidtrainError(
            f"SLURM: {ntasks} tasks (--ntasks / srun -n) without --ntasks-per-node; Lightning "
            f"places ranks by tasks per node: use --ntasks-per-node={devices} (= trainer.devices)"
        )
    known = per_node is not None and per_node.isdigit() and str(devices).isdigit()
    if known and int(str(per_node)) != int(devices):
        raise MidtrainError(
            f"trainer.devices: {devices}, but SLURM runs {per_node} tasks per node "
            f"(--ntasks-per-node); set --trainer.devices {per_node} or change the job"
        )


def default_logger(logger: Any, root: str, subcommand: str, resume_step: int | None) -> Any:
    """The logger config: one fixed TensorBoard directory per run, unless the user chose one.

    TensorBoard events, config.yaml and checkpoints live together, and ``--ckpt_path last``
    finds the run's own last checkpoint. Evaluation gets its own subdirectory: the run's
    config, hparams and events stay as training left them. On resume TensorBoard drops the
    events a killed run wrote after its checkpoint (``purge_step``): no step shows twice."""
    if logger in (None, True):
        version = "" if subcommand == "fit" else subcommand
        logger = Namespace(
            class_path="lightning.pytorch.loggers.TensorBoardLogger",
            init_args=Namespace(save_dir=root, name="", version=version),
        )
    if (
        subcommand == "fit"
        and resume_step is not None
        and getattr(logger, "class_path", "").endswith("TensorBoardLogger")
    ):
        logger.init_args.purge_step = resume_step
    return logger


def check_val_limits(trainer: pl.Trainer, datamodule: LightningDataModule | None) -> None:
    """A validation set is the same blocks for any world size: its size comes from the data
    module, never from Lightning's per-process batch limits."""
    if not isinstance(datamodule, StepDataModule):
        return
    for key in ("limit_val_batches", "limit_test_batches"):
        value = getattr(trainer, key)
        if value not in (0, 1.0) or (value == 1 and isinstance(value, int)):
            sizes = (
                "data.val_max_blocks"
                if isinstance(datamodule, MixtureDataModule)
                else "data.val_max_examples and data.general_val_max_blocks"
            )
            raise MidtrainError(
                f"trainer.{key}: {value} counts batches per process, so the evaluated "
                "sequences would change with the number of processes; set the size of each "
                f"validation set with {sizes} ({key}: 0 turns it off)"
            )


def is_local_checkpoint(ckpt: str) -> bool:
    """A ``ckpt_path`` naming a file here (not Lightning's keywords or a remote URL)."""
    return (
        bool(ckpt)
        and ckpt not in ("last", "best", "hpc")
        and not (ckpt.startswith("registry") or "://" in ckpt)
    )


# -- the CLI ------------------------------------------------------------------------------------


class MidtrainCLI(KeepConfigOnResume, LightningCLI):
    """LightningCLI with midtrain's callbacks, defaults, ``--fork`` and checks."""

    resume: ResumePlan
    checkpoint_dir: Path

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(MixtureLogging, "mixture_logging")
        parser.add_lightning_class_args(Preemption, "preemption")
        parser.add_lightning_class_args(DivergenceGuard, "divergence")
        parser.add_lightning_class_args(RunSummary, "summary")  # the run's last lines
        # A resumed run overwrites its own last.ckpt (never a stray last-v1.ckpt).
        parser.set_defaults(
            {"checkpoint.save_last": True, "checkpoint.enable_version_counter": False}
        )
        # The model's vocabulary follows the tokenizer unless model_config fixes it.
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.add_argument(
            "--fork",
            type=str | None,
            default=None,
            help="start a new run from this checkpoint, keeping model, optimizer, LR schedule "
            "and data position, with this run's (new or extended) schedule",
        )
        parser.add_argument(
            "--fork_optimizer",
            type=Literal["keep", "reset"] | None,
            default=None,
            help="with --fork: keep the checkpoint's AdamW state (default) or reset it to a "
            "new optimizer's (the weights are loaded either way)",
        )
        parser.add_argument(
            "--fork_data",
            type=Literal["keep", "fresh"] | None,
            default=None,
            help="with --fork: continue the checkpoint's data stream (default), or start this "
            "run's schedule as a new stream at the fork step (its first samples)",
        )
        parser.add_argument(
            "--weights",
            type=str,
            default="live",
            help="validate/test: which weights of --ckpt_path to evaluate: live (default), or "
            "ema (the average kept by midtrain.callbacks.EMA)",
        )

    def _cfg(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg, subcommand = self._cfg(), str(self.subcommand)
        evaluation_defaults(cfg, subcommand)
        trainer_defaults(cfg.trainer, subcommand)
        check_slurm_tasks(cfg.trainer)
        dirpath = cfg.get("checkpoint", {}).get("dirpath") if "checkpoint" in cfg else None
        self.checkpoint_dir = (
            Path(dirpath) if dirpath else run_checkpoints(cfg.trainer.default_root_dir)
        )
        # reading only: errors and the explaining lines come in before_fit, after the config's
        # own errors
        self.resume = plan_resume(cfg.get("ckpt_path"), self.checkpoint_dir, self.subcommand)
        cfg.ckpt_path = self.resume.ckpt_path
        cfg.trainer.logger = default_logger(
            cfg.trainer.logger, cfg.trainer.default_root_dir, subcommand, self.resume.step
        )

    def _check(self) -> None:
        if self.datamodule is not None:  # the data contract, checked before any write
            self.model.connect(self.datamodule)
        if self.resume.error:
            raise MidtrainError(self.resume.error)
        ckpt = str(self._cfg().get("ckpt_path") or "")  # a missing file would fail after logging
        if is_local_checkpoint(ckpt):
            self.resume.checkpoint_metadata(ckpt, "ckpt_path")  # missing, truncated, not one
        self._check_weights(ckpt)
        for cb in self.trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning, undeclared
            if isinstance(cb, EMA):
                cb.check(self.trainer)
        check_val_limits(self.trainer, self.datamodule)
        if self.subcommand in ("validate", "test") and self.trainer.is_global_zero:
            print(f"midtrain {self.subcommand}: {self._evaluated_weights(ckpt)}")

    def _check_weights(self, ckpt: str) -> None:
        """``--weights ema``: validate/test of a checkpoint holding an EMA average."""
        weights = self._cfg().get("weights", "live")
        check_weights_choice(weights)
        if weights == "live":
            return
        if self.subcommand not in ("validate", "test"):
            raise MidtrainError(f"--weights: {weights} is for validate and test only")
        if not is_local_checkpoint(ckpt):
            raise MidtrainError("--weights ema: give the checkpoint with --ckpt_path <file>")
        averaged_state(self.resume.checkpoint_metadata(ckpt, "ckpt_path"), ckpt)
        self.model.checkpoint_weights = weights

    def _evaluated_weights(self, ckpt: str) -> str:
        """Which weights validate/test evaluate, for the first line of their output."""
        what, path = (
            ("checkpoint", ckpt)
            if ckpt
            else ("model.init_from (weights only)", str(self._cfg().model.init_from))
        )
        if self.model.checkpoint_weights == "ema":
            what = f"the averaged (EMA) weights of {what}"
        if os.path.exists(path):
            step = (
                self.resume.checkpoint_metadata(path, "ckpt_path") if ckpt else read_metadata(path)
            ).get("global_step")
            if step is not None:
                return f"evaluating {what} {path} (trained {step} steps)"
        return f"evaluating {what} {path}"

    def before_fit(self) -> None:
        self._check()
        fork = self.config["fit"].get("fork")
        if fork:
            self._start_fork(fork)
        else:
            self._check_not_forking()
        check_run_dir(
            Path(self.trainer.default_root_dir),
            self.checkpoint_dir,
            fresh=not self.config["fit"].get("ckpt_path"),
        )
        if isinstance(self.datamodule, MixtureDataModule):
            self._register_schedule(self.datamodule)
        self._check_resume(fork=bool(fork))
        # every check passed: from here on the run may write
        for line in self.resume.lines:
            say(line)
        use_atomic_checkpoints(self.trainer)
        for stale in remove_stale_temps(self.checkpoint_dir):
            say(f"midtrain: removed {stale}, left by a save that was killed")

    def _start_fork(self, fork: str) -> None:
        if self.config["fit"].get("ckpt_path"):
            raise MidtrainError("fork: give either --fork or --ckpt_path, not both")
        step = self.resume.checkpoint_metadata(fork, "fork")["global_step"]
        options = self._fork_options()
        self.model.fork_optimizer = options.get("fork_optimizer", "keep")
        fork_data = options.get("fork_data", "keep")
        if fork_data != "keep" and not getattr(self.datamodule, "fresh_data", False):
            raise fresh_data_unsupported(self.datamodule)
        if isinstance(self.datamodule, StepDataModule):
            self.datamodule.fork_step = step
            self.datamodule.fork_data = fork_data
        set_run_argument(self, "fit", "ckpt_path", fork)

    def _fork_options(self) -> dict[str, str]:
        """The ``--fork_*`` options given (None: not given)."""
        cfg = self.config["fit"]
        return {k: cfg[k] for k in FORK_OPTIONS if cfg.get(k) is not None}

    def _check_not_forking(self) -> None:
        """Without --fork: fork options only restate how a resumed run was forked (checked
        against its run record in ``_check_resume``), and an anneal has nothing to start at."""
        resuming = bool(self.config["fit"].get("ckpt_path"))
        options = self._fork_options()
        if options and not resuming:
            key = next(iter(options))
            raise MidtrainError(
                f"{key}: {options[key]} is an option of a fork; add --fork <checkpoint>, or "
                f"drop --{key}"
            )
        schedule = self.model.hparams.get("lr_schedule")
        if schedule in ANNEALS and not resuming:
            raise anneal_without_checkpoint(schedule)

    def _register_schedule(self, datamodule: MixtureDataModule) -> None:
        """Refuse a bad schedule before anything is written: the switches register now
        (``MixtureSwitch.setup`` registers them again, idempotently, inside fit)."""
        max_steps = require_max_steps(self.trainer, "midtrain schedules data by steps")
        for cb in self.trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning, undeclared
            if isinstance(cb, MixtureSwitch):
                cb.register(datamodule, max_steps)
        datamodule.resolve_schedule(self.trainer)
        for cb in self.trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning, undeclared
            if isinstance(cb, AdaptiveMixture):
                cb.check(self.trainer, datamodule)

    def _check_resume(self, fork: bool) -> None:
        """Refuse a checkpoint this run cannot continue exactly (or a fork that would change
        the past), before Lightning writes anything into the run directory."""
        ckpt = self.config_init["fit"].get("ckpt_path")
        if not ckpt or not os.path.exists(ckpt):
            return
        meta = self.resume.checkpoint_metadata(ckpt, "ckpt_path")
        saved = meta.get("midtrain", {}).get("run")
        where = f"{'--fork' if fork else '--ckpt_path'} {ckpt}"
        if saved is not None:
            now = run_record(self.model, self.datamodule, self.trainer)
            refuse_differences(saved, now, fork, where)
        if not fork:
            check_fork_options((saved or {}).get("fork"), self._fork_options(), where)
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning, undeclared
        check_ema_resume(meta, callbacks, fork, where)
        for cb in self.trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning, undeclared
            if isinstance(cb, AdaptiveMixture):
                cb.continues(meta.get("callbacks", {}).get(cb.state_key), fork)
        if self.datamodule is None:
            return
        data_state = checkpoint_datamodule_state(meta, self.datamodule)
        if data_state is not None:
            self.datamodule.load_state_dict(data_state)

    before_validate = before_test = before_predict = _check


def trainer_main(argv: Sequence[str]) -> None:
    """Run one LightningCLI subcommand (``argv[0]``); every error becomes one line."""
    # No prefix matching: `--trainer.max_step 3` is an error, not a silent `max_steps`.
    parser_kwargs: dict[str, Any] = {"allow_abbrev": False}
    if not any(a in ("-h", "--help") or a.startswith("--print_config") for a in argv):
        parser_kwargs["exit_on_error"] = False
    with recording_errors() as raised:
        try:
            with _as_sys_argv(argv):
                MidtrainCLI(
                    CausalLM,
                    LightningDataModule,
                    subclass_mode_data=True,
                    trainer_class=Trainer,
                    save_config_kwargs={"overwrite": True},
                    auto_configure_optimizers=False,  # CausalLM owns its optimizer and LR schedule
                    parser_kwargs={k: dict(parser_kwargs) for k in TRAINER_COMMANDS}
                    | parser_kwargs,
                )
        except MidtrainError:
            raise
        except Exception as e:
            raise translate_cli_error(e, raised, argv) from None


@contextlib.contextmanager
def _as_sys_argv(argv: Sequence[str]) -> Iterator[None]:
    """LightningCLI reads ``sys.argv`` (so do DDP's relaunched processes); ``args=`` while
    ``sys.argv`` holds something else (``main([...])`` from Python or a test) only makes it warn.
    So the command's own arguments are ``sys.argv`` while it runs."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "midtrain", *argv]
    try:
        yield
    finally:
        sys.argv = saved
