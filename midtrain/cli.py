"""The ``midtrain`` command: a small dispatcher in front of LightningCLI and our own tools."""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from midtrain.errors import MidtrainError

TRAINER_COMMANDS = {
    "fit": "train a model (LightningCLI: --config, --print_config, --ckpt_path last to resume)",
    "validate": "evaluate a checkpoint on every validation set (val/<set>/loss)",
    "test": "run the test loop of a model and data module",
    "predict": "run the predict loop of a model and data module",
}
TOOL_COMMANDS = {
    "prepare": "tokenize named domains into a token store (--config <yaml>)",
    "similarity": "token-statistics similarity of a store's domains and mixtures (CSV, markdown)",
    "experiment": "a whole study: pretrain once, fork branches, SFT grid, results table",
    "demo": "the CPU-scale study end to end on built-in data (configs/study/cpu.yaml)",
    "consolidate": "a distributed (sharded) checkpoint as one file: consolidate <dir> <out.ckpt>",
}


def _usage() -> str:
    lines = ["usage: midtrain <command> [options]   (midtrain <command> --help for its options)",
             "", "commands:"]
    for name, text in {**TRAINER_COMMANDS, **TOOL_COMMANDS}.items():
        lines.append(f"  {name:<10} {text}")
    lines += ["", "Set MIDTRAIN_TRACEBACK=1 to see full tracebacks of errors."]
    return "\n".join(lines)


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


# -- our own tools ---------------------------------------------------------------------------

def _tool_parser(command: str, description: str) -> Any:
    """A jsonargparse parser for a tool subcommand: --config files, no prefix matching, and
    errors raised (not printed with usage) so they become one line."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=f"midtrain {command}", exit_on_error=False, allow_abbrev=False,
                            description=description)
    parser.add_argument("--config", action=ActionConfigFile, help=f"a {command} YAML")
    return parser


def _parse(parser: Any, args: Sequence[str], what: str) -> Any:
    """Parse, letting --help / --print_config print and exit; any error is one line."""
    if any(a in ("-h", "--help") or a.startswith("--print_config") for a in args):
        parser.parse_args(list(args))  # prints and exits
    try:
        return parser.instantiate(parser.parse_args(list(args)))
    except MidtrainError:
        raise
    except Exception as e:  # argparse.ArgumentError and jsonargparse's own
        raise MidtrainError(f"{what}: {one_line(e)}") from None


def _fields_of(cls: type, namespace: Any) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names}


def prepare_main(args: Sequence[str]) -> None:
    from midtrain.data.prepare import PrepareConfig, prepare

    parser = _tool_parser("prepare", "Tokenize named domains into a token store.")
    parser.add_class_arguments(PrepareConfig)
    prepare(PrepareConfig(**_fields_of(PrepareConfig, _parse(parser, args, "prepare config"))))


def similarity_main(args: Sequence[str]) -> None:
    from midtrain.similarity import run

    parser = _tool_parser("similarity", run.__doc__.splitlines()[0])
    parser.add_function_arguments(run)
    init = _parse(parser, args, "similarity")
    run(**{k: v for k, v in vars(init).items() if k != "config"})


def experiment_main(args: Sequence[str]) -> None:
    from midtrain.experiment import ExperimentConfig, run_experiment

    parser = _tool_parser("experiment", "Run a midtraining study from one config.")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the stages and token plan, run nothing")
    parser.add_class_arguments(ExperimentConfig)
    init = _parse(parser, args, "experiment config")
    run_experiment(ExperimentConfig(**_fields_of(ExperimentConfig, init)), dry_run=init.dry_run)


def consolidate_main(args: Sequence[str]) -> None:
    if len(args) != 2 or args[0].startswith("-"):
        raise MidtrainError("usage: midtrain consolidate <distributed checkpoint dir> <out.ckpt>")
    from midtrain.checkpoint import consolidate

    print(f"written {consolidate(args[0], args[1])}")


def demo_main(args: Sequence[str]) -> None:
    from midtrain.paths import resolve_config

    experiment_main(["--config", str(resolve_config("configs/study/cpu.yaml")), *args])


# -- fit / validate / test / predict ----------------------------------------------------------

def trainer_main(argv: Sequence[str]) -> None:
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.core.datamodule import LightningDataModule

    from midtrain import fault
    from midtrain._lightning import KeepConfigOnResume
    from midtrain.callbacks import ModelCheckpoint, Throughput
    from midtrain.checkpoint import read_metadata
    from midtrain.lm import CausalLM
    from midtrain.paths import run_checkpoints
    from midtrain.trainer import Trainer

    class MidtrainCLI(KeepConfigOnResume, LightningCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.add_lightning_class_args(Throughput, "throughput")
            parser.add_lightning_class_args(fault.Preemption, "preemption")
            parser.add_lightning_class_args(fault.DivergenceGuard, "divergence")
            # A resumed run overwrites its own last.ckpt (never a stray last-v1.ckpt).
            parser.set_defaults({"checkpoint.save_last": True,
                                 "checkpoint.enable_version_counter": False})
            # The model's vocabulary follows the tokenizer unless model_config fixes it.
            parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
            parser.add_argument(
                "--fork", type=str | None, default=None,
                help="start a new run from this checkpoint, keeping model, optimizer, LR "
                     "schedule and data position, with this run's (new or extended) schedule")

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            trainer = cfg.trainer
            root = trainer.default_root_dir or "runs/midtrain"
            trainer.default_root_dir = root
            if trainer.get("max_steps") is None:  # `--trainer.max_steps null`
                if self.subcommand == "fit":
                    raise MidtrainError("trainer.max_steps: null; set a positive number of "
                                        "optimizer steps (midtrain's schedules are in steps)")
                trainer.max_steps = -1  # Lightning's "no limit"; evaluation does not use it
            self._plan_resume(cfg)
            if trainer.logger in (None, True) and self.subcommand != "fit":
                # evaluation gets its own subdirectory: the run's config, hparams and events
                # stay as training left them
                from jsonargparse import Namespace

                trainer.logger = Namespace(
                    class_path="lightning.pytorch.loggers.TensorBoardLogger",
                    init_args=Namespace(save_dir=root, name="", version=self.subcommand),
                )
            if trainer.logger in (None, True):
                # One fixed directory per run: TensorBoard events, config.yaml and checkpoints
                # live together, and `--ckpt_path last` finds the run's own last checkpoint.
                from jsonargparse import Namespace

                trainer.logger = Namespace(
                    class_path="lightning.pytorch.loggers.TensorBoardLogger",
                    init_args=Namespace(save_dir=root, name="", version=""),
                )
            logger = trainer.logger
            if (self.subcommand == "fit" and self._resume_step is not None
                    and getattr(logger, "class_path", "").endswith("TensorBoardLogger")):
                # events a killed run wrote after its checkpoint would show every replayed
                # step twice: TensorBoard drops events from this step on (SummaryWriter kwarg)
                logger.init_args.purge_step = self._resume_step

        def _plan_resume(self, cfg: Any) -> None:
            """Resolve ``--ckpt_path last`` / ``last_or_new`` to a file (reading only; errors and
            the explaining lines come in before_fit, after the config's own errors)."""
            self._resume_error: str | None = None
            self._resume_lines: list[str] = []
            self._resume_step: int | None = None
            ckpt = cfg.get("ckpt_path")
            dirpath = cfg.get("checkpoint", {}).get("dirpath") if "checkpoint" in cfg else None
            directory = Path(dirpath) if dirpath else run_checkpoints(cfg.trainer.default_root_dir)
            self._checkpoint_dir = directory
            if ckpt in ("last", "last_or_new"):
                found = fault.resume_checkpoint(directory, self._resume_lines.append)
                if found is not None:
                    cfg.ckpt_path = str(found)
                elif ckpt == "last":
                    self._resume_error = (f"ckpt_path: last: no checkpoint in {directory}; start "
                                          "without --ckpt_path, or use --ckpt_path last_or_new")
                elif self.subcommand != "fit":
                    self._resume_error = "ckpt_path: last_or_new is for fit only"
                else:
                    cfg.ckpt_path = None
                    self._resume_lines.append(
                        f"midtrain: NO CHECKPOINT in {directory}: starting a new run "
                        "(--ckpt_path last_or_new)")
            ckpt = cfg.get("ckpt_path")
            if ckpt and Path(str(ckpt)).exists():
                meta, _ = fault.loadable(Path(str(ckpt)))
                if meta is not None:
                    self._resume_step = int(meta["global_step"])

        def _check(self) -> None:
            if hasattr(self.model, "check_data") and self.datamodule is not None:
                self.model.check_data(self.datamodule)
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            if self._resume_error:
                raise MidtrainError(self._resume_error)
            ckpt = str(cfg.get("ckpt_path") or "")  # a missing file would fail after logging
            if (ckpt and ckpt not in ("last", "best", "hpc") and not ckpt.startswith("registry")
                    and "://" not in ckpt):
                fault.check_checkpoint(ckpt, "ckpt_path")  # missing, truncated, not one

        def before_fit(self) -> None:
            self._check()
            self._check_val_interval()
            fork = self.config["fit"].get("fork")
            if fork:
                if self.config["fit"].get("ckpt_path"):
                    raise MidtrainError("fork: give either --fork or --ckpt_path, not both")
                step = fault.check_checkpoint(fork, "fork")["global_step"]
                if hasattr(self.datamodule, "fork_step"):
                    self.datamodule.fork_step = step
                self.config_init["fit"]["ckpt_path"] = fork
            self._check_run_dir(fresh=not self.config["fit"].get("ckpt_path"))
            if hasattr(self.datamodule, "resolve_schedule"):
                self.datamodule.resolve_schedule(self.trainer)  # refuse a bad schedule early
            self._check_resume(fork=bool(fork))
            # every check passed: from here on the run may write
            for line in self._resume_lines:
                fault.say(line)
            fault.use_atomic_checkpoints(self.trainer)
            for stale in fault.remove_stale_temps(self._checkpoint_dir):
                fault.say(f"midtrain: removed {stale}, left by a save that was killed")

        def _check_run_dir(self, fresh: bool) -> None:
            """The run directory can be written, and a new run does not mix with another's
            checkpoints (a later --ckpt_path last would pick from both)."""
            root = Path(self.trainer.default_root_dir)
            for path in (root, self._checkpoint_dir):
                if path.exists() and not path.is_dir():
                    raise MidtrainError(f"trainer.default_root_dir: {path} is a file, not a run "
                                        "directory; choose another path")
            existing = next((p for p in (self._checkpoint_dir, root, *root.parents)
                             if p.exists()), None)
            if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
                raise MidtrainError(f"trainer.default_root_dir: {existing} is not writable; "
                                    "fix its permissions or choose another run directory")
            if fresh and (found := fault.run_checkpoints_in(self._checkpoint_dir)):
                raise MidtrainError(
                    f"trainer.default_root_dir: {self._checkpoint_dir} already holds another "
                    f"run's checkpoints ({found[0].name}, ...); continue it with --ckpt_path "
                    "last, or choose a new trainer.default_root_dir")

        def _check_val_interval(self) -> None:
            t = self.trainer
            interval = t.val_check_interval
            batches = (t.max_steps or 0) * t.accumulate_grad_batches
            if isinstance(interval, int) and batches > 0 and interval > batches:
                raise MidtrainError(
                    f"trainer.val_check_interval: {interval} batches is beyond the run's "
                    f"{batches} (max_steps x accumulate_grad_batches); lower it"
                )

        def _check_resume(self, fork: bool) -> None:
            """Refuse a checkpoint this run cannot continue exactly (or a fork that would
            change the past), before Lightning writes anything into the run directory."""
            ckpt = self.config_init["fit"].get("ckpt_path")
            if not ckpt or not os.path.exists(ckpt):
                return
            meta = read_metadata(ckpt)
            saved = meta.get("midtrain", {}).get("run")
            if saved is not None:
                now = fault.run_record(self.model, self.datamodule, self.trainer)
                diffs = fault.resume_differences(saved, now, fork)
                if diffs:
                    what = "--fork" if fork else "--ckpt_path"
                    hint = ("a fork may change the optimizer settings, max_steps and the "
                            "schedule from the fork step on, not the past" if fork else
                            "resume with the checkpoint's settings, or start a new run from it "
                            "with --fork")
                    raise MidtrainError(f"{what} {ckpt}: it was trained with another setup: "
                                        f"{'; '.join(diffs)}; {hint}")
            if self.datamodule is None:
                return
            data_state = meta.get(type(self.datamodule).__qualname__)
            if data_state is not None:
                self.datamodule.load_state_dict(data_state)

        before_validate = before_test = before_predict = _check

    # No prefix matching: `--trainer.max_step 3` is an error, not a silent `max_steps`.
    parser_kwargs: dict[str, Any] = {"allow_abbrev": False}
    if not any(a in ("-h", "--help") or a.startswith("--print_config") for a in argv):
        parser_kwargs["exit_on_error"] = False
    MidtrainError.last = None
    try:
        MidtrainCLI(
            CausalLM, LightningDataModule, subclass_mode_data=True, trainer_class=Trainer,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # CausalLM owns its optimizer and LR schedule
            parser_kwargs={k: dict(parser_kwargs) for k in TRAINER_COMMANDS} | parser_kwargs,
            # None = read sys.argv (passing it again only makes LightningCLI warn)
            args=None if list(argv) == sys.argv[1:] else list(argv),
        )
    except MidtrainError:
        raise
    except Exception as e:
        cause: BaseException | None = e  # jsonargparse wraps errors raised while instantiating
        while cause is not None and not isinstance(cause, MidtrainError):
            cause = cause.__cause__ or cause.__context__
        if cause is None and MidtrainError.last is not None:
            cause = MidtrainError.last  # wrapped without a chain (older jsonargparse)
        if cause is not None:
            raise cause from None
        if type(e).__name__ == "ArgumentError" or "jsonargparse" in type(e).__module__:
            raise MidtrainError(f"config: {one_line(e)}") from None
        raise


# -- entry point ---------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    **{name: None for name in TRAINER_COMMANDS},  # type: ignore[dict-item]
    "prepare": prepare_main,
    "similarity": similarity_main,
    "experiment": experiment_main,
    "demo": demo_main,
    "consolidate": consolidate_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"midtrain: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # Our streams shard by rank and worker themselves, so the length caveat does not apply.
    warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined")
    try:
        if command in TRAINER_COMMANDS:
            trainer_main([command, *rest])
        else:
            COMMANDS[command](rest)
    except MidtrainError as e:
        if os.environ.get("MIDTRAIN_TRACEBACK"):
            traceback.print_exc()
        print(f"midtrain {command}: error: {one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 2: bad input; 3: training diverged (fault.py)
    except SystemExit as e:
        from midtrain.fault import Preempted

        if isinstance(e, Preempted):  # checkpoint written: exit so the scheduler requeues
            return int(e.code)
        raise
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
