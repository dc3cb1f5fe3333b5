"""The ``midtrain`` command: a small dispatcher in front of LightningCLI and our own tools."""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from midtrain.errors import MidtrainError, find_midtrain_error, recording_errors

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

    from midtrain._lightning import checkpoint_datamodule_state, set_run_argument
    from midtrain.callbacks import MixtureLogging, MixtureSwitch, ModelCheckpoint, Throughput
    from midtrain.checkpoint import read_metadata
    from midtrain.data.contract import require_max_steps
    from midtrain.data.datamodule import MixtureDataModule
    from midtrain.lm import CausalLM
    from midtrain.paths import LAST, checkpoint_dir
    from midtrain.trainer import Trainer

    class MidtrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.add_lightning_class_args(Throughput, "throughput")
            parser.add_lightning_class_args(MixtureLogging, "mixture_logging")
            parser.set_defaults({"checkpoint.save_last": True})
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

        def _check(self) -> None:
            if self.datamodule is not None:  # the data contract, checked before any write
                self.model.connect(self.datamodule)
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            ckpt = str(cfg.get("ckpt_path") or "")  # a missing file would fail after logging
            if (ckpt and ckpt not in ("last", "best", "hpc") and not ckpt.startswith("registry")
                    and "://" not in ckpt and not os.path.exists(ckpt)):
                raise MidtrainError(f"ckpt_path: checkpoint not found: {ckpt}")

        def before_fit(self) -> None:
            self._check()
            self._check_val_interval()
            fork = self.config["fit"].get("fork")
            if fork:
                if self.config["fit"].get("ckpt_path"):
                    raise MidtrainError("fork: give either --fork or --ckpt_path, not both")
                if not os.path.exists(fork):
                    raise MidtrainError(f"fork: checkpoint not found: {fork}")
                step = read_metadata(fork)["global_step"]
                if hasattr(self.datamodule, "fork_step"):
                    self.datamodule.fork_step = step
                set_run_argument(self, "fit", "ckpt_path", fork)
            if isinstance(self.datamodule, MixtureDataModule):
                # refuse a bad schedule before anything is written: the switches register now
                # (MixtureSwitch.setup registers them again, idempotently, inside fit)
                max_steps = require_max_steps(self.trainer, "midtrain schedules data by steps")
                for cb in self.trainer.callbacks:
                    if isinstance(cb, MixtureSwitch):
                        cb.register(self.datamodule, max_steps)
                self.datamodule.resolve_schedule(self.trainer)
            self._check_resume()

        def _check_val_interval(self) -> None:
            t = self.trainer
            interval = t.val_check_interval
            batches = (t.max_steps or 0) * t.accumulate_grad_batches
            if isinstance(interval, int) and batches > 0 and interval > batches:
                raise MidtrainError(
                    f"trainer.val_check_interval: {interval} batches is beyond the run's "
                    f"{batches} (max_steps x accumulate_grad_batches); lower it"
                )

        def _check_resume(self) -> None:
            """Refuse a checkpoint whose data the datamodule cannot continue, before Lightning
            writes anything into the run directory."""
            ckpt = self.config_init["fit"].get("ckpt_path")
            if ckpt == "last":
                ckpt = str(checkpoint_dir(self.trainer) / LAST)
            if not ckpt or not os.path.exists(ckpt) or self.datamodule is None:
                return
            data_state = checkpoint_datamodule_state(read_metadata(ckpt), self.datamodule)
            if data_state is not None:
                self.datamodule.load_state_dict(data_state)

        before_validate = before_test = before_predict = _check

    # No prefix matching: `--trainer.max_step 3` is an error, not a silent `max_steps`.
    parser_kwargs: dict[str, Any] = {"allow_abbrev": False}
    if not any(a in ("-h", "--help") or a.startswith("--print_config") for a in argv):
        parser_kwargs["exit_on_error"] = False
    with recording_errors() as raised:
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
            # jsonargparse wraps errors raised while instantiating our classes: in the
            # exception chain, or (older versions, a Union's subtype) only in its message
            cause = find_midtrain_error(e) or (raised[-1] if raised else None)
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
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
