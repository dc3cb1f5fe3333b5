"""The ``midtrain`` command: a small dispatcher in front of LightningCLI and our own tools."""

from __future__ import annotations

import codecs
import dataclasses
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from midtrain.errors import MidtrainError, find_midtrain_error, recording_errors

TRAINER_COMMANDS = {
    "fit": "train a model (LightningCLI: --config, --print_config, --ckpt_path last to resume)",
    "validate": "evaluate a checkpoint on every validation set (val/<set>/loss)",
    "test": "like validate, logged as test/<set>/loss (in <run>/test/)",
    "predict": "run the predict loop of a model and data module",
}
TOOL_COMMANDS = {
    "prepare": "tokenize named domains into a token store (--config <yaml>; --verify <store>)",
    "similarity": "token-statistics similarity of a store's domains and mixtures (CSV, markdown)",
    "experiment": "a whole study: pretrain once, fork branches, SFT grid, results table",
    "demo": "the CPU-scale study end to end on built-in data (configs/study/cpu.yaml)",
    "consolidate": "a distributed (sharded) checkpoint as one file: consolidate <dir> <out.ckpt>",
    "export": "a checkpoint as a Hugging Face transformers model directory (--ckpt, --out)",
    "generate": "sample text from a checkpoint or hf:<model> (--ckpt, --prompt ...)",
    "lm-eval": "lm-evaluation-harness with the `midtrain` model registered (lm_eval's arguments)",
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
        from midtrain.yaml_input import explain_dict_error

        raise MidtrainError(explain_dict_error(one_line(e)) or f"{what}: {one_line(e)}") from None


def _fields_of(cls: type, namespace: Any) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names}


def prepare_main(args: Sequence[str]) -> None:
    from midtrain.data.prepare import PrepareConfig, prepare

    if args and args[0] == "--verify":  # check a store's files against its manifests
        from midtrain.data.prepare import verify_store

        if len(args) != 2:
            raise MidtrainError("usage: midtrain prepare --verify <store dir>")
        return verify_store(args[1])
    parser = _tool_parser("prepare", "Tokenize named domains into a token store. "
                          "`midtrain prepare --verify <store>` rehashes a store's files.")
    parser.add_class_arguments(PrepareConfig)
    parser.add_argument("--shard", type=str, help="i/N: encode only shard i of N (one node of "
                        "a multi-node prepare), then run once with --merge")
    parser.add_argument("--merge", action="store_true", help="build the store from the shards")
    parser.add_argument("--tokenizer_only", action="store_true",
                        help="train (or load) the tokenizer once, for --shard runs to share")
    init = _parse(parser, args, "prepare config")
    shard = None
    if init.shard is not None:
        i, _, n = init.shard.partition("/")
        if not (i.isdigit() and n.isdigit()):
            raise MidtrainError(f"--shard: expected i/N (e.g. 0/4), got {init.shard!r}")
        shard = (int(i), int(n))
    prepare(PrepareConfig(**_fields_of(PrepareConfig, init)), shard=shard, merge=init.merge,
            tokenizer_only=init.tokenizer_only)


def similarity_main(args: Sequence[str]) -> None:
    from midtrain.similarity import run

    parser = _tool_parser("similarity", run.__doc__.splitlines()[0])
    parser.add_function_arguments(run)
    init = _parse(parser, args, "similarity")
    run(**{k: v for k, v in vars(init).items() if k != "config"})


def experiment_main(args: Sequence[str]) -> None:
    from midtrain.paths import resolve_config
    from midtrain.study import ExperimentConfig, run_experiment

    # a shipped study config is found by name from any directory, like the configs it names
    args = [str(resolve_config(a)) if prev == "--config" else a
            for prev, a in zip(["", *args], args, strict=False)]
    parser = _tool_parser("experiment", "Run a midtraining study from one config.")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the stages and token plan, run nothing")
    parser.add_argument("--rerun_changed", action="store_true",
                        help="re-run finished stages whose config changed (and the stages "
                             "that start from them) instead of refusing")
    parser.add_class_arguments(ExperimentConfig)
    init = _parse(parser, args, "experiment config")
    run_experiment(ExperimentConfig(**_fields_of(ExperimentConfig, init)), dry_run=init.dry_run,
                   rerun_changed=init.rerun_changed)


def consolidate_main(args: Sequence[str]) -> None:
    if len(args) != 2 or args[0].startswith("-"):
        raise MidtrainError("usage: midtrain consolidate <distributed checkpoint dir> <out.ckpt>")
    from midtrain.checkpoint import consolidate

    print(f"written {consolidate(args[0], args[1])}")


def export_main(args: Sequence[str]) -> None:
    from midtrain.hf import MAX_SHARD_SIZE, export

    parser = _tool_parser("export", "Write a checkpoint as a Hugging Face model directory.")
    parser.add_argument("--ckpt", required=True, help="checkpoint file or distributed directory")
    parser.add_argument("--out", required=True, help="new directory to write")
    parser.add_argument("--dtype", default="float32", help="float32, bf16 or fp16")
    parser.add_argument("--tokenizer", type=str | None, default=None,
                        help="tokenizer.json, store dir or hf:model (default: the run's store)")
    parser.add_argument("--eos", type=str | None, default=None, help="end-of-text token")
    parser.add_argument("--max_shard_size", default=MAX_SHARD_SIZE,
                        help="safetensors shard size, e.g. 5GB")
    a = _parse(parser, args, "export")
    print(f"written {export(a.ckpt, a.out, a.dtype, a.tokenizer, a.eos, a.max_shard_size)}")


def generate_main(args: Sequence[str]) -> None:
    from midtrain.generation import Sampling, generate_text
    from midtrain.hf import load_model

    parser = _tool_parser("generate", "Generate text from a checkpoint or an HF model.")
    parser.add_argument("--ckpt", required=True, help="checkpoint, or hf:<dir or id>[@revision]")
    parser.add_argument("--prompt", action="append", required=True,
                        help="a prompt; repeat for a batch")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int | None, default=None)
    parser.add_argument("--top_p", type=float | None, default=None)
    parser.add_argument("--seed", type=int | None, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string; repeatable")
    parser.add_argument("--tokenizer", type=str | None, default=None)
    parser.add_argument("--device", default="cpu")
    a = _parse(parser, args, "generate")
    model, tok, eos = load_model(a.ckpt, a.tokenizer, a.device)
    # a shell passes "\n" as two characters: read escapes, so --stop "\n\n" means a blank line
    stops = [codecs.decode(s, "unicode_escape") for s in a.stop]
    sampling = Sampling(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                        top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop=stops,
                        stop_ids=[eos] if eos is not None else [])
    vocab = min(model.config.padded_vocab_size, tok.get_vocab_size(with_added_tokens=True))
    for prompt, text in zip(a.prompt, generate_text(model, tok, a.prompt, sampling, vocab),
                            strict=True):
        print(prompt + text)
        if len(a.prompt) > 1:
            print("---")


def lm_eval_main(args: Sequence[str]) -> None:
    from midtrain.evaluation.harness import run_cli

    run_cli(list(args))


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

    from midtrain import fault
    from midtrain._lightning import (
        KeepConfigOnResume,
        checkpoint_datamodule_state,
        set_run_argument,
    )
    from midtrain.callbacks import MixtureLogging, MixtureSwitch, ModelCheckpoint, Throughput
    from midtrain.checkpoint import read_metadata
    from midtrain.data.contract import StepDataModule, require_max_steps
    from midtrain.data.datamodule import MixtureDataModule
    from midtrain.lm import CausalLM
    from midtrain.paths import run_checkpoints
    from midtrain.trainer import Trainer

    class MidtrainCLI(KeepConfigOnResume, LightningCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.add_lightning_class_args(Throughput, "throughput")
            parser.add_lightning_class_args(MixtureLogging, "mixture_logging")
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
            if self.subcommand in ("validate", "test") and not (
                    cfg.get("ckpt_path") or cfg.model.get("init_from")):
                raise MidtrainError(
                    f"ckpt_path: `midtrain {self.subcommand}` evaluates trained weights; give "
                    "--ckpt_path <checkpoint> (or `last` of the run), or --model.init_from "
                    "<checkpoint>")
            if self.subcommand in ("validate", "test"):
                # `limit_val_batches: 0` in a fit config turns periodic validation off; the
                # command whose whole job is evaluation evaluates the whole sets.
                key = "limit_val_batches" if self.subcommand == "validate" else "limit_test_batches"
                if cfg.trainer.get(key) == 0:
                    cfg.trainer[key] = 1.0
            trainer = cfg.trainer
            root = trainer.default_root_dir or "runs/midtrain"
            trainer.default_root_dir = root
            if trainer.get("max_steps") is None:  # `--trainer.max_steps null`
                if self.subcommand == "fit":
                    raise MidtrainError("trainer.max_steps: null; set a positive number of "
                                        "optimizer steps (midtrain's schedules are in steps)")
                trainer.max_steps = -1  # Lightning's "no limit"; evaluation does not use it
            self._plan_resume(cfg)
            if trainer.logger in (None, True):
                # One fixed directory per run: TensorBoard events, config.yaml and checkpoints
                # live together, and `--ckpt_path last` finds the run's own last checkpoint.
                # Evaluation gets its own subdirectory: the run's config, hparams and events
                # stay as training left them.
                from jsonargparse import Namespace

                version = "" if self.subcommand == "fit" else self.subcommand
                trainer.logger = Namespace(
                    class_path="lightning.pytorch.loggers.TensorBoardLogger",
                    init_args=Namespace(save_dir=root, name="", version=version),
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
            self._metadata: dict[str, dict[str, Any]] = {}  # per checkpoint path, read once
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
                    self._metadata[str(ckpt)] = meta
                    self._resume_step = int(meta["global_step"])

        def _checkpoint_metadata(self, path: str, what: str) -> dict[str, Any]:
            """A checkpoint's metadata (read once per path), or a one-line error naming it."""
            if str(path) not in self._metadata:
                self._metadata[str(path)] = fault.check_checkpoint(path, what)
            return self._metadata[str(path)]

        def _check(self) -> None:
            if self.datamodule is not None:  # the data contract, checked before any write
                self.model.connect(self.datamodule)
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            if self._resume_error:
                raise MidtrainError(self._resume_error)
            ckpt = str(cfg.get("ckpt_path") or "")  # a missing file would fail after logging
            if (ckpt and ckpt not in ("last", "best", "hpc") and not ckpt.startswith("registry")
                    and "://" not in ckpt):
                self._checkpoint_metadata(ckpt, "ckpt_path")  # missing, truncated, not one
            self._check_val_limits()
            if self.subcommand in ("validate", "test") and self.trainer.is_global_zero:
                print(f"midtrain {self.subcommand}: {self._evaluated_weights(ckpt, cfg)}")

        def _evaluated_weights(self, ckpt: str, cfg: Any) -> str:
            """Which weights validate/test evaluate, for the first line of their output."""
            what, path = ("checkpoint", ckpt) if ckpt else (
                "model.init_from (weights only)", str(cfg.model.init_from))
            if os.path.exists(path):
                step = (self._checkpoint_metadata(path, "ckpt_path") if ckpt
                        else read_metadata(path)).get("global_step")
                if step is not None:
                    return f"evaluating {what} {path} (trained {step} steps)"
            return f"evaluating {what} {path}"

        def _check_val_limits(self) -> None:
            """A validation set is the same blocks for any world size: its size comes from the
            data module, never from Lightning's per-process batch limits."""
            if not isinstance(self.datamodule, StepDataModule):
                return
            for key in ("limit_val_batches", "limit_test_batches"):
                value = getattr(self.trainer, key)
                if value not in (0, 1.0) or (value == 1 and isinstance(value, int)):
                    sizes = ("data.val_max_blocks" if isinstance(self.datamodule, MixtureDataModule)
                             else "data.val_max_examples and data.general_val_max_blocks")
                    raise MidtrainError(
                        f"trainer.{key}: {value} counts batches per process, so the evaluated "
                        "sequences would change with the number of processes; set the size of "
                        f"each validation set with {sizes} ({key}: 0 turns it off)")

        def before_fit(self) -> None:
            self._check()
            fork = self.config["fit"].get("fork")
            if fork:
                if self.config["fit"].get("ckpt_path"):
                    raise MidtrainError("fork: give either --fork or --ckpt_path, not both")
                step = self._checkpoint_metadata(fork, "fork")["global_step"]
                if isinstance(self.datamodule, StepDataModule):
                    self.datamodule.fork_step = step
                set_run_argument(self, "fit", "ckpt_path", fork)
            self._check_run_dir(fresh=not self.config["fit"].get("ckpt_path"))
            if isinstance(self.datamodule, MixtureDataModule):
                # refuse a bad schedule before anything is written: the switches register now
                # (MixtureSwitch.setup registers them again, idempotently, inside fit)
                max_steps = require_max_steps(self.trainer, "midtrain schedules data by steps")
                for cb in self.trainer.callbacks:
                    if isinstance(cb, MixtureSwitch):
                        cb.register(self.datamodule, max_steps)
                self.datamodule.resolve_schedule(self.trainer)
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


        def _check_resume(self, fork: bool) -> None:
            """Refuse a checkpoint this run cannot continue exactly (or a fork that would
            change the past), before Lightning writes anything into the run directory."""
            ckpt = self.config_init["fit"].get("ckpt_path")
            if not ckpt or not os.path.exists(ckpt):
                return
            meta = self._checkpoint_metadata(ckpt, "ckpt_path")
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
            data_state = checkpoint_datamodule_state(meta, self.datamodule)
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
                from midtrain.yaml_input import explain_dict_error

                raise MidtrainError(explain_dict_error(one_line(e))
                                    or f"config: {one_line(e)}") from None
            raise


# -- entry point ---------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    **{name: None for name in TRAINER_COMMANDS},  # type: ignore[dict-item]
    "prepare": prepare_main,
    "similarity": similarity_main,
    "experiment": experiment_main,
    "demo": demo_main,
    "consolidate": consolidate_main,
    "export": export_main,
    "generate": generate_main,
    "lm-eval": lm_eval_main,
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
    from midtrain import quiet, yaml_input

    quiet.quiet_lightning(command)
    try:
        yaml_input.install()
        yaml_input.check_args(rest)
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
