"""``midtrain fit | validate | test | predict``: LightningCLI with midtrain's defaults, its
resume planning and its checks before anything is written.

The hooks only order the steps; what they decide lives elsewhere: which checkpoint
``--ckpt_path last`` means (``midtrain.checkpoint.resume.plan_resume``), what the command does
with it and what it refuses (one ``RunPlan``, checked by ``midtrain.checkpoint.plan`` and
handed to the trainer), where a run or an evaluation writes
(``midtrain.checkpoint.layout.check_run_dir``, ``evaluation_dir``, ``default_logger``).
``fit`` is the only command that writes into a run directory; validate, test and predict of a
run write into ``<run>/<command>/`` (or the ``--trainer.default_root_dir`` given)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.core.datamodule import LightningDataModule
from lightning.pytorch.plugins.environments import SLURMEnvironment

from midtrain.checkpoint.atomic import remove_stale_temps, use_atomic_checkpoints
from midtrain.checkpoint.files import check_weights_choice
from midtrain.checkpoint.layout import CHECKPOINTS, check_run_dir, run_checkpoints, unused_dir
from midtrain.checkpoint.plan import (
    Fork,
    RunPlan,
    check_checkpoint,
    check_fork_options,
    check_start,
    parts_of,
    plan_of,
)
from midtrain.checkpoint.resume import ResumePlan, plan_resume
from midtrain.cli.errors import translate_cli_error
from midtrain.data.contract import StepDataModule
from midtrain.data.datamodule import MixtureDataModule
from midtrain.errors import MidtrainError, recording_errors
from midtrain.train._lightning import (
    KeepConfigOnResume,
    checkpoint_datamodule_state,
    set_run_argument,
)
from midtrain.train.callbacks.checkpoints import ModelCheckpoint
from midtrain.train.callbacks.divergence import DivergenceGuard
from midtrain.train.callbacks.mixture import MixtureLogging
from midtrain.train.callbacks.preemption import Preemption
from midtrain.train.callbacks.summary import RunSummary
from midtrain.train.callbacks.throughput import Throughput
from midtrain.train.module import CausalLM
from midtrain.train.trainer import Trainer

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
EVALUATIONS = ("validate", "test", "predict")  # commands that read a run
DEFAULT_ROOT = "runs/midtrain"
FORK_OPTIONS = ("fork_optimizer", "fork_data")
TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


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


def tensorboard_logger(directory: str | Path) -> Namespace:
    """TensorBoard writing straight into ``directory``: its events, config.yaml and (for fit)
    checkpoints live together. No placeholder ``hp_metric`` (Lightning's -1)."""
    return Namespace(
        class_path=TENSORBOARD,
        init_args=Namespace(save_dir=str(directory), name="", version="", default_hp_metric=False),
    )


def default_logger(logger: Any, root: str, subcommand: str, resume_step: int | None) -> Any:
    """fit's logger config: one fixed TensorBoard directory per run, unless the user chose a
    logger; ``--ckpt_path last`` finds the run's own last checkpoint. On resume TensorBoard
    drops the events a killed run wrote after its checkpoint (``purge_step``): no step shows
    twice."""
    if logger in (None, True):
        logger = tensorboard_logger(root)
    if (
        subcommand == "fit"
        and resume_step is not None
        and getattr(logger, "class_path", "").endswith("TensorBoardLogger")
    ):
        logger.init_args.purge_step = resume_step
    return logger


def given_on_command_line(key: str, argv: Sequence[str]) -> bool:
    """Whether ``--<key>`` was given on the command line (not only in a --config file)."""
    return any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv)


def evaluation_dir(cfg: Namespace, subcommand: str, argv: Sequence[str]) -> Path:
    """Where validate/test/predict write: ``--trainer.default_root_dir`` when given on the
    command line (``<it>/<command>`` when it is a run directory, one holding ``checkpoints/``),
    else ``<run>/<command>``, where the run is the evaluated checkpoint's (the directory above
    its ``checkpoints/``) or the config's ``trainer.default_root_dir``; a directory that
    already holds an evaluation is not reused (``unused_dir``: ``<dir>-2``, ...). So a run's
    own config.yaml, hparams.yaml, summary and events stay as fit left them, and an earlier
    evaluation's as it left them."""
    if given_on_command_line("trainer.default_root_dir", argv):
        given = Path(cfg.trainer.default_root_dir)
        return unused_dir(given / subcommand if (given / CHECKPOINTS).is_dir() else given)
    ckpt = Path(str(cfg.get("ckpt_path") or ""))
    if ckpt.parent.name == CHECKPOINTS:
        return unused_dir(ckpt.parent.parent / subcommand)
    return unused_dir(Path(cfg.trainer.default_root_dir) / subcommand)


def evaluation_logger(logger: Any, directory: Path) -> Any:
    """The logger config of an evaluation: TensorBoard (or the user's own loggers) writing
    into ``directory``; ``false`` stays off (config.yaml still goes there)."""
    if logger is False:
        return False
    if logger in (None, True):
        return tensorboard_logger(directory)
    for one in logger if isinstance(logger, list) else [logger]:
        args = getattr(one, "init_args", None)
        if args is not None and "save_dir" in args:
            args.save_dir = str(directory)
            for key in ("name", "version"):
                if key in args:
                    args[key] = ""
            if "purge_step" in args:
                args.purge_step = None
    return logger


def fork_arguments(options: dict[str, str]) -> dict[str, str]:
    """``--fork_optimizer``/``--fork_data`` as ``Fork``'s arguments."""
    return {k.removeprefix("fork_"): v for k, v in options.items()}


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


class RunConfig(SaveConfigCallback):
    """``config.yaml``, written by the command that creates its directory: a new run, a fork,
    an evaluation's own directory. A resume keeps its run's, so the run's saved config always
    continues it with ``midtrain fit --config <run>/config.yaml --ckpt_path last``."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if plan_of(trainer).mode == "resume":
            log_dir = trainer.log_dir  # a broadcast: every rank asks
            kept = log_dir is not None and (Path(log_dir) / self.config_filename).is_file()
            if trainer.strategy.broadcast(kept):
                self.already_saved = True
        super().setup(trainer, pl_module, stage)


class MidtrainCLI(KeepConfigOnResume, LightningCLI):
    """LightningCLI with midtrain's callbacks, defaults, ``--fork`` and checks."""

    resume: ResumePlan
    checkpoint_dir: Path
    trainer: Trainer

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
            help="which weights of a checkpoint to read: live (default), or ema (the average "
            "kept by midtrain.callbacks.EMA): of --ckpt_path for validate/test, of "
            "model.init_from for fit",
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
        if subcommand in EVALUATIONS:
            # an evaluation reads a run and writes only its own directory
            where = evaluation_dir(cfg, subcommand, sys.argv[1:])
            cfg.trainer.default_root_dir = str(where)
            cfg.trainer.logger = evaluation_logger(cfg.trainer.logger, where)
        else:
            cfg.trainer.logger = default_logger(
                cfg.trainer.logger, cfg.trainer.default_root_dir, subcommand, self.resume.step
            )

    # -- the plan: built once, checked before anything is written, handed to the trainer ----
    def _plan(self) -> RunPlan:
        """What this command does with a checkpoint."""
        cfg = self._cfg()
        weights = cfg.get("weights", "live")
        check_weights_choice(weights)
        ckpt = cfg.get("ckpt_path")
        if self.subcommand != "fit":
            if weights != "live" and self.subcommand not in ("validate", "test"):
                raise MidtrainError(f"--weights: {weights} is for validate and test only")
            if weights != "live" and not is_local_checkpoint(str(ckpt or "")):
                raise MidtrainError("--weights ema: give the checkpoint with --ckpt_path <file>")
            return RunPlan(str(self.subcommand), ckpt, weights=weights)
        fork, options = cfg.get("fork"), self._fork_options()
        if fork and not ckpt:
            step = int(self.resume.checkpoint_metadata(fork, "fork")["global_step"])
            return RunPlan("fit", fork, Fork(step, **fork_arguments(options)), weights)
        if options and not ckpt:
            key = next(iter(options))
            raise MidtrainError(
                f"{key}: {options[key]} is an option of a fork; add --fork <checkpoint>, or "
                f"drop --{key}"
            )
        return RunPlan("fit", ckpt, weights=weights)

    def _check(self) -> RunPlan:
        """Every check of this command, before anything is written; then the trainer gets
        the plan."""
        if self.datamodule is not None:  # the data contract
            self.model.connect(self.datamodule)
        if self.resume.error:
            raise MidtrainError(self.resume.error)
        ckpt = str(self._cfg().get("ckpt_path") or "")  # a missing file would fail after logging
        if is_local_checkpoint(ckpt):
            self.resume.checkpoint_metadata(ckpt, "ckpt_path")  # missing, truncated, not one
        plan = self._plan()
        self.trainer.run_plan = plan
        if self.datamodule is not None:
            # as fit attaches them (again): the parts read the plan and each other through it
            self.datamodule.trainer = self.trainer
            self.trainer.datamodule = self.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared
        parts = parts_of(self.model, self.datamodule, self.trainer.callbacks)  # type: ignore[attr-defined]  # set by Lightning, undeclared
        check_start(plan, parts, self.trainer)
        if plan.checkpoint is not None and os.path.exists(plan.checkpoint):
            meta = self.resume.checkpoint_metadata(plan.checkpoint, "ckpt_path")
            check_checkpoint(plan, meta, parts, self.trainer)
            if plan.mode == "resume":
                self._check_branch_resume(meta, plan)
        check_val_limits(self.trainer, self.datamodule)
        return plan

    def _check_branch_resume(self, meta: dict[str, Any], plan: RunPlan) -> None:
        """A resume states how its run was forked only through ``--fork`` and ``--fork_*``
        (a branch's own config.yaml holds them): they must be what the run was forked with."""
        saved = ((meta.get("midtrain") or {}).get("run") or {}).get("fork")
        fork = self._cfg().get("fork")
        if fork:
            if saved is None:
                raise MidtrainError(
                    f"fork: {plan.where} continues a run that was not forked; drop --fork "
                    "(a resume), or drop --ckpt_path (a new fork)"
                )
            if os.path.exists(fork):
                step = self.resume.checkpoint_metadata(fork, "fork")["global_step"]
                if step != saved.get("step"):
                    raise MidtrainError(
                        f"fork: {fork} is a checkpoint of step {step}, but {plan.where} "
                        f"continues a run forked at step {saved.get('step')}; drop --fork"
                    )
        check_fork_options(saved, plan, self._fork_options())

    def _fork_options(self) -> dict[str, str]:
        """The ``--fork_*`` options given (None: not given)."""
        cfg = self._cfg()
        return {k: cfg[k] for k in FORK_OPTIONS if cfg.get(k) is not None}

    def _evaluate(self) -> None:
        plan = self._check()
        if self.trainer.is_global_zero:
            print(f"midtrain {self.subcommand}: {self._evaluated_weights(plan)}")

    def _evaluated_weights(self, plan: RunPlan) -> str:
        """Which weights validate/test evaluate, for the first line of their output."""
        init_from = str(self._cfg().model.init_from)
        what, path = (
            ("checkpoint", plan.checkpoint)
            if plan.checkpoint
            else ("model.init_from (weights only)", init_from)
        )
        if plan.weights == "ema":
            what = f"the averaged (EMA) weights of {what}"
        if os.path.exists(path):
            meta = self.resume.checkpoint_metadata(path, "ckpt_path")
            step = meta.get("global_step")
            if step is not None:
                return f"evaluating {what} {path} (trained {step} steps)"
        return f"evaluating {what} {path}"

    def before_fit(self) -> None:
        plan = self._check()
        if plan.fork is not None:
            set_run_argument(self, "fit", "ckpt_path", plan.checkpoint)
        check_run_dir(
            Path(self.trainer.default_root_dir), self.checkpoint_dir, fresh=plan.mode != "resume"
        )
        if plan.mode in ("resume", "fork"):
            self._restore_data_early(plan)
        # every check passed: from here on the run may write
        for line in self.resume.lines:
            say(line)
        use_atomic_checkpoints(self.trainer)
        for stale in remove_stale_temps(self.checkpoint_dir):
            say(f"midtrain: removed {stale}, left by a save that was killed")

    def _restore_data_early(self, plan: RunPlan) -> None:
        """The data module's state before anything is written: its own refusals (a changed
        ``start_items``) come now, and the schedule is the whole one (Lightning restores it
        again, the same way)."""
        if self.datamodule is None or plan.checkpoint is None:
            return
        meta = self.resume.checkpoint_metadata(plan.checkpoint, "ckpt_path")
        state = checkpoint_datamodule_state(meta, self.datamodule)
        if state is not None:
            self.datamodule.load_state_dict(state)

    before_validate = before_test = before_predict = _evaluate


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
                    save_config_callback=RunConfig,
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
