"""The ``midtrain`` command: a small dispatcher in front of LightningCLI and our own tools."""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from midtrain.errors import MidtrainError

TRAINER_COMMANDS = {
    "fit": "train a model (LightningCLI: --config, --print_config, --ckpt_path last to resume)",
    "validate": "evaluate a checkpoint on every validation set (val/<set>/loss)",
    "test": "like validate, logged as test/<set>/loss (in <run>/test/)",
    "predict": "run the predict loop of a model and data module",
}
TOOL_COMMANDS = {
    "prepare": "tokenize named domains into a token store (--config <yaml>)",
    "similarity": "token-statistics similarity of a store's domains and mixtures (CSV, markdown)",
    "experiment": "a whole study: pretrain once, fork branches, SFT grid, results table",
    "demo": "the CPU-scale study end to end on built-in data (configs/study/cpu.yaml)",
    "consolidate": "a distributed (sharded) checkpoint as one file: consolidate <dir> <out.ckpt>",
    "configs": "the ready-made configs shipped with midtrain: configs list | show | copy",
}


def _usage() -> str:
    lines = ["usage: midtrain <command> [options]   (midtrain <command> --help for its options)",
             "", "commands:"]
    for name, text in {**TRAINER_COMMANDS, **TOOL_COMMANDS}.items():
        lines.append(f"  {name:<12}{text}")
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


DEMO_CONFIG = "configs/study/cpu.yaml"


DEMO_USAGE = """usage: midtrain demo [--dry_run] [--output DIR] [any midtrain experiment option]

The CPU-scale study end to end on built-in data (no network): prepare the built-in data and SFT
sets, pretrain once, fork a midtraining and a CPT branch, fine-tune every branch on two targets
with two seeds, and print the results table; about 6 minutes on 2 CPU cores. The same as
`midtrain experiment --config configs/study/cpu.yaml`.

options:
  -h, --help    show this message and exit
  --dry_run     print the stages and token plan, run nothing
  --output DIR  where the study writes (default runs/experiments/cpu); data goes to data/
  Any key of configs/study/cpu.yaml can be overridden the same way, e.g. --sft.seeds '[0]'
  (see midtrain experiment --help, and --print_config for the resolved study)."""


def demo_main(args: Sequence[str]) -> None:
    """`midtrain experiment` on the shipped CPU study config, with its own usage."""
    from midtrain.paths import resolve_config

    if any(a in ("-h", "--help") for a in args):
        print(DEMO_USAGE)
        return
    experiment_main(["--config", str(resolve_config("configs/study/cpu.yaml")), *args])


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """Every ``--config FILE`` (``--config=FILE``, ``-c FILE``) with FILE resolved by
    `midtrain.paths.resolve_config`: a ready-made config works by name from any directory."""
    from midtrain.paths import resolve_config

    out = list(args)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = str(resolve_config(out[i + 1]))
        elif arg.startswith("--config="):
            out[i] = "--config=" + str(resolve_config(arg.split("=", 1)[1]))
    return out


CONFIGS_USAGE = """usage: midtrain configs list                 the ready-made configs, by name
       midtrain configs show <name>          print one
       midtrain configs copy <name> <dest>   copy a config (or a kind, e.g. pretrain, or all)
                                             out of the package, to edit it

A name is a path inside the shipped configs (pretrain/demo.yaml, configs/pretrain/demo.yaml).
Any --config takes such a name directly when no local file of that name exists."""


def configs_main(args: Sequence[str]) -> None:
    from midtrain.paths import copy_configs, list_configs, show_config

    action, rest = (args[0], list(args[1:])) if args else ("", [])
    if action in ("-h", "--help", ""):
        print(CONFIGS_USAGE)
        if not action:
            raise MidtrainError("configs: give an action: list, show or copy")
    elif action == "list" and not rest:
        print(list_configs())
    elif action == "show" and len(rest) == 1:
        print(show_config(rest[0]), end="")
    elif action == "copy" and len(rest) == 2:
        for written in copy_configs(rest[0], rest[1]):  # dest as typed: a trailing / = folder
            print(f"written {written}")
    else:
        raise MidtrainError(f"configs: unknown or incomplete action {' '.join(args)!r}; "
                            f"see midtrain configs --help")


# -- fit / validate / test / predict ----------------------------------------------------------

def trainer_main(argv: Sequence[str]) -> None:
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.core.datamodule import LightningDataModule

    from midtrain.callbacks import ModelCheckpoint, Throughput
    from midtrain.checkpoint import read_metadata
    from midtrain.lm import CausalLM
    from midtrain.paths import LAST, checkpoint_dir
    from midtrain.trainer import Trainer

    class MidtrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.add_lightning_class_args(Throughput, "throughput")
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
            if hasattr(self.model, "check_data") and self.datamodule is not None:
                self.model.check_data(self.datamodule)
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
                self.config_init["fit"]["ckpt_path"] = fork
            if hasattr(self.datamodule, "resolve_schedule"):
                self.datamodule.resolve_schedule(self.trainer)  # refuse a bad schedule early
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
            data_state = read_metadata(ckpt).get(type(self.datamodule).__qualname__)
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
    "configs": configs_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], resolve_config_args(argv[1:])
    if argv[1:] != rest and argv == sys.argv[1:]:
        sys.argv[2:] = rest  # LightningCLI (and DDP's relaunch) read sys.argv
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
