"""The ``midtrain`` command: one table of subcommands, each resolved lazily (``midtrain --help``
and ``midtrain prepare`` never import Lightning), in front of LightningCLI and our own tools."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NamedTuple

from midtrain.errors import MidtrainError
from midtrain.train import preemption_signals


class Command(NamedTuple):
    help: str
    target: str  # "module:function", imported when the command runs
    trainer: bool = False  # a LightningCLI subcommand: the function gets [command, *args]


COMMANDS: dict[str, Command] = {
    "fit": Command(
        "train a model (LightningCLI: --config, --print_config, --ckpt_path last to resume)",
        "midtrain.cli.fit:trainer_main",
        trainer=True,
    ),
    "validate": Command(
        "evaluate a checkpoint on every validation set (val/<set>/loss)",
        "midtrain.cli.fit:trainer_main",
        trainer=True,
    ),
    "test": Command(
        "like validate, logged as test/<set>/loss (in <run>/test/)",
        "midtrain.cli.fit:trainer_main",
        trainer=True,
    ),
    "predict": Command(
        "run the predict loop of a model and data module",
        "midtrain.cli.fit:trainer_main",
        trainer=True,
    ),
    "prepare": Command(
        "tokenize named domains into a token store (--config <yaml>; --verify <store>)",
        "midtrain.cli.tools:prepare_main",
    ),
    "similarity": Command(
        "token-statistics similarity of a store's domains and mixtures (CSV, markdown)",
        "midtrain.cli.tools:similarity_main",
    ),
    "advise": Command(
        "rank candidate mixtures per SFT target (--config); measure them (--proxy); a "
        "regression on runs (--fit); --check <study>",
        "midtrain.cli.tools:advise_main",
    ),
    "experiment": Command(
        "a whole study: pretrain once, fork branches, SFT grid, results table",
        "midtrain.cli.tools:experiment_main",
    ),
    "demo": Command(
        "the CPU-scale study end to end on built-in data (configs/study/cpu.yaml)",
        "midtrain.cli.tools:demo_main",
    ),
    "consolidate": Command(
        "a distributed (sharded) checkpoint as one file: consolidate <dir> <out.ckpt>",
        "midtrain.cli.tools:consolidate_main",
    ),
    "export": Command(
        "a checkpoint as a Hugging Face transformers model directory (--ckpt, --out)",
        "midtrain.cli.tools:export_main",
    ),
    "average": Command(
        "a uniform soup of checkpoints of one model: average CKPT1 CKPT2 ... --out PATH",
        "midtrain.cli.tools:average_main",
    ),
    "generate": Command(
        "sample text from a checkpoint or hf:<model> (--ckpt, --prompt ...)",
        "midtrain.cli.tools:generate_main",
    ),
    "lm-eval": Command(
        "lm-evaluation-harness with the `midtrain` model registered (lm_eval's arguments)",
        "midtrain.cli.tools:lm_eval_main",
    ),
    "configs": Command(
        "the ready-made configs shipped with midtrain: configs list | show | copy",
        "midtrain.cli.configs:configs_main",
    ),
}


def usage() -> str:
    lines = [
        "usage: midtrain <command> [options]   (midtrain <command> --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<12}{command.help}" for name, command in COMMANDS.items()]
    lines += ["", "Set MIDTRAIN_TRACEBACK=1 to see full tracebacks of errors."]
    return "\n".join(lines)


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """Every ``--config FILE`` (``--config=FILE``, ``-c FILE``) with FILE resolved by
    ``midtrain.configs.resolve_config``: a ready-made config works by name from any directory."""
    from midtrain.configs import resolve_config

    out = list(args)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = str(resolve_config(out[i + 1]))
        elif arg.startswith("--config="):
            out[i] = "--config=" + str(resolve_config(arg.split("=", 1)[1]))
    return out


def _function(command: Command) -> Callable[[Sequence[str]], None]:
    module, name = command.target.split(":")
    return getattr(importlib.import_module(module), name)


def run_command(name: str, args: list[str]) -> int:
    """Run one subcommand; a ``MidtrainError`` is one line on stderr and its exit code."""
    from midtrain.cli import quiet, yaml_input
    from midtrain.cli.errors import one_line

    command = COMMANDS[name]
    fork = any(a == "--fork" or a.startswith("--fork=") for a in args)
    quiet.quiet_lightning(name, fork=name == "fit" and fork)
    try:
        yaml_input.install()
        yaml_input.check_args(args)
        _function(command)([name, *args] if command.trainer else args)
    except MidtrainError as e:
        if os.environ.get("MIDTRAIN_TRACEBACK"):
            traceback.print_exc()
        print(f"midtrain {name}: error: {one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 2: bad input; 3: training diverged
    except SystemExit as e:
        from midtrain.train.preemption_signals import Preempted

        if isinstance(e, Preempted):  # checkpoint written, or nothing trained yet: requeue
            return int(e.code)
        raise
    except KeyboardInterrupt:
        return 130
    finally:
        if name == "fit":
            preemption_signals.stop_watching()  # for a caller in Python; a process ends here
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit":
        # first thing, before torch and Lightning are imported: a preemption signal at any
        # moment of the start is honoured (exit 143, requeue), never the signal's default kill
        preemption_signals.watch_from_start(alone=preemption_signals.alone_at_start())
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], resolve_config_args(argv[1:])
    if argv[1:] != rest and argv == sys.argv[1:]:
        sys.argv[2:] = rest  # LightningCLI (and DDP's relaunch) read sys.argv
    if command not in COMMANDS:
        print(f"midtrain: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_command(command, rest)


if __name__ == "__main__":
    sys.exit(main())
