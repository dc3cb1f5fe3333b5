"""midtrain's own tools behind the command table: prepare, similarity, advise, experiment, demo,
consolidate, export, average, generate, lm-eval."""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from midtrain.cli.errors import config_error
from midtrain.errors import MidtrainError

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

    from midtrain.study import ExperimentConfig


WEIGHTS_HELP = "live, or ema (the average of midtrain.callbacks.EMA)"  # export, generate


def _tool_parser(command: str, description: str) -> ArgumentParser:
    """A jsonargparse parser for a tool subcommand: --config files, no prefix matching, and
    errors raised (not printed with usage) so they become one line; YAML read the midtrain way
    (``yaml_input.install``), also when called from Python."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from midtrain.cli import yaml_input

    yaml_input.install()

    parser = ArgumentParser(
        prog=f"midtrain {command}", exit_on_error=False, allow_abbrev=False, description=description
    )
    parser.add_argument("--config", action=ActionConfigFile, help=f"a {command} YAML")
    return parser


def _parse(parser: ArgumentParser, args: Sequence[str], what: str) -> Namespace:
    """Parse, letting --help / --print_config print and exit; any error is one line."""
    if any(a in ("-h", "--help") or a.startswith("--print_config") for a in args):
        parser.parse_args(list(args))  # prints and exits
    try:
        return parser.instantiate(parser.parse_args(list(args)))
    except MidtrainError:
        raise
    except Exception as e:  # argparse.ArgumentError and jsonargparse's own
        raise config_error(e, what) from None


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
    parser = _tool_parser(
        "prepare",
        "Tokenize named domains into a token store. "
        "`midtrain prepare --verify <store>` rehashes a store's files.",
    )
    parser.add_class_arguments(PrepareConfig)
    parser.add_argument(
        "--shard",
        type=str,
        help="i/N: encode only shard i of N (one node of "
        "a multi-node prepare), then run once with --merge",
    )
    parser.add_argument("--merge", action="store_true", help="build the store from the shards")
    parser.add_argument(
        "--tokenizer_only",
        action="store_true",
        help="train (or load) the tokenizer once, for --shard runs to share",
    )
    init = _parse(parser, args, "prepare config")
    shard = None
    if init.shard is not None:
        i, _, n = init.shard.partition("/")
        if not (i.isdigit() and n.isdigit()):
            raise MidtrainError(f"--shard: expected i/N (e.g. 0/4), got {init.shard!r}")
        shard = (int(i), int(n))
    prepare(
        PrepareConfig(**_fields_of(PrepareConfig, init)),
        shard=shard,
        merge=init.merge,
        tokenizer_only=init.tokenizer_only,
    )


def similarity_main(args: Sequence[str]) -> None:
    from midtrain.study.similarity import run

    parser = _tool_parser("similarity", (run.__doc__ or "").split("\n")[0])
    parser.add_function_arguments(run)
    init = _parse(parser, args, "similarity")
    run(**{k: v for k, v in vars(init).items() if k != "config"})


def _given(args: Sequence[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in args)


def advise_main(args: Sequence[str]) -> None:
    """`midtrain advise --config <yaml>` ranks candidates; `--check <study output>` calibrates
    (with `--proxy_steps N`, measured proxies too); `--fit TRAIN --predict TEST` is the mixture
    regression; `--proxy <yaml>` the proxy sweep."""
    if _given(args, "--fit"):
        return _advise_fit(args)
    if _given(args, "--proxy"):
        return _advise_proxy(args)
    if _given(args, "--check"):
        return _advise_check(args)
    from pathlib import Path

    from midtrain.study import advisor

    parser = _tool_parser(
        "advise",
        (advisor.advise.__doc__ or "").splitlines()[0]
        + " `midtrain advise --check <study output>` compares it with a finished study;"
        " `--fit TRAIN.csv --predict TEST.csv --target COLUMN` fits a mixture regression;"
        " `--proxy <sweep.yaml>` measures candidates with short proxy runs.",
    )
    parser.add_function_arguments(advisor.advise)
    parser.add_argument("--out", type=str, default="results/advise", help="where advice.csv goes")
    a = _parse(parser, args, "advise config")
    advice = advisor.advise(**{k: v for k, v in vars(a).items() if k not in ("config", "out")})
    print(advisor.to_markdown(advice))
    print(f"written {advisor.write_advice(advice, Path(a.out))} and advice.md")


def _advise_check(args: Sequence[str]) -> None:
    from pathlib import Path

    from midtrain.study import advisor, calibration

    parser = _tool_parser("advise", (calibration.calibrate.__doc__ or "").splitlines()[0])
    parser.add_argument("--check", required=True, help="a finished study's output directory")
    parser.add_argument("--out", type=str | None, default=None, help="default <study>/advise")
    parser.add_function_arguments(calibration.calibrate, skip={"study"})
    a = _parse(parser, args, "advise --check")
    kwargs = {k: v for k, v in vars(a).items() if k not in ("config", "check", "out")}
    cal = calibration.calibrate(a.check, **kwargs)
    print(advisor.to_markdown(cal.advice) + "\n\n" + calibration.to_markdown(cal))
    written = calibration.write_calibration(cal, Path(a.out or Path(a.check) / "advise"))
    print("written " + ", ".join(str(p) for p in written))


def _advise_fit(args: Sequence[str]) -> None:
    from midtrain.study import regression

    parser = _tool_parser(
        "advise --fit",
        "A mixture regression on a table of runs (one row per run: feature columns and the "
        "measured target): gradient-boosted trees or a Data-Mixing-Laws fit, chosen by "
        "cross-validation; predicts TEST's rows with a conformal interval.",
    )
    parser.add_argument("--fit", required=True, help="TRAIN.csv: the runs to fit on")
    parser.add_argument("--predict", required=True, help="TEST.csv: the runs to predict")
    parser.add_argument("--target", required=True, help="the column to predict")
    parser.add_argument(
        "--features",
        type=str | None,
        default=None,
        help="comma-separated columns or shell patterns (train_*); default every numeric "
        "column but the target",
    )
    parser.add_argument(
        "--out", type=str, default="results/advise/predictions.csv", help="the CSV to write"
    )
    parser.add_argument("--model", type=str, default="auto", help="auto, gbt or mixing_law")
    parser.add_argument("--level", type=float, default=0.9, help="the interval's coverage")
    parser.add_argument("--seed", type=int, default=0, help="folds and trees")
    a = _parse(parser, args, "advise --fit")
    features = [f.strip() for f in a.features.split(",") if f.strip()] if a.features else None
    regression.run(a.fit, a.predict, a.target, features, a.out, a.model, a.level, a.seed)


def _advise_proxy(args: Sequence[str]) -> None:
    from midtrain.study import sweep

    parser = _tool_parser("advise --proxy", (sweep.__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--proxy", required=True, help="the sweep's YAML (configs/advise/proxy-cpu.yaml)"
    )
    parser.add_argument(
        "--rerun_changed",
        action="store_true",
        help="re-run proxies whose config changed instead of refusing",
    )
    a = _parse(parser, args, "advise --proxy")
    sweep.run_sweep(sweep.load_sweep(a.proxy), rerun_changed=a.rerun_changed)


def experiment_config(args: Sequence[str]) -> tuple[ExperimentConfig, Namespace]:
    """The study config of ``midtrain experiment <args>``, and the parsed options."""
    from midtrain.configs import resolve_config
    from midtrain.study import ExperimentConfig

    # a shipped study config is found by name from any directory, like the configs it names
    args = [
        str(resolve_config(a)) if prev == "--config" else a
        for prev, a in zip(["", *args], args, strict=False)
    ]
    parser = _tool_parser("experiment", "Run a midtraining study from one config.")
    parser.add_argument(
        "--dry_run", action="store_true", help="print the stages and token plan, run nothing"
    )
    parser.add_argument(
        "--rerun_changed",
        action="store_true",
        help="re-run finished stages whose config changed (and the stages "
        "that start from them) instead of refusing",
    )
    parser.add_class_arguments(ExperimentConfig)
    init = _parse(parser, args, "experiment config")
    return ExperimentConfig(**_fields_of(ExperimentConfig, init)), init


def experiment_main(args: Sequence[str]) -> None:
    from midtrain.study import run_experiment

    cfg, init = experiment_config(args)
    run_experiment(cfg, dry_run=init.dry_run, rerun_changed=init.rerun_changed)


def consolidate_main(args: Sequence[str]) -> None:
    if len(args) != 2 or args[0].startswith("-"):
        raise MidtrainError("usage: midtrain consolidate <distributed checkpoint dir> <out.ckpt>")
    from midtrain.checkpoint.files import consolidate

    print(f"written {consolidate(args[0], args[1])}")


def export_main(args: Sequence[str]) -> None:
    from midtrain.checkpoint.export import MAX_SHARD_SIZE, export

    parser = _tool_parser("export", "Write a checkpoint as a Hugging Face model directory.")
    parser.add_argument("--ckpt", required=True, help="checkpoint file or distributed directory")
    parser.add_argument("--out", required=True, help="new directory to write")
    parser.add_argument("--dtype", default="float32", help="float32, bf16 or fp16")
    parser.add_argument(
        "--tokenizer",
        type=str | None,
        default=None,
        help="tokenizer.json, store dir or hf:model (default: the run's store)",
    )
    parser.add_argument("--eos", type=str | None, default=None, help="end-of-text token")
    parser.add_argument(
        "--max_shard_size", default=MAX_SHARD_SIZE, help="safetensors shard size, e.g. 5GB"
    )
    parser.add_argument("--weights", default="live", help=WEIGHTS_HELP)
    a = _parse(parser, args, "export")
    out = export(a.ckpt, a.out, a.dtype, a.tokenizer, a.eos, a.max_shard_size, a.weights)
    print(f"written {out}")


def average_main(args: Sequence[str]) -> None:
    from midtrain.checkpoint.average import average_checkpoints

    parser = _tool_parser(
        "average",
        "A uniform soup: the elementwise mean of the weights of several checkpoints of one "
        "model, written as a new checkpoint file (for validate --ckpt_path, export, init_from).",
    )
    parser.add_argument("ckpts", nargs="*", help="checkpoint files (at least 2)")
    parser.add_argument("--out", required=True, help="the new checkpoint file to write")
    parser.add_argument(
        "--weights", default="live", help="live, or ema (average the EMA weights of each)"
    )
    a = _parse(parser, args, "average")
    print(f"written {average_checkpoints(a.ckpts, a.out, a.weights)}")


def generate_main(args: Sequence[str]) -> None:
    from midtrain.checkpoint.load import load_model
    from midtrain.model.generation import complete

    parser = _tool_parser("generate", "Generate text from a checkpoint or an HF model.")
    parser.add_argument("--ckpt", required=True, help="checkpoint, or hf:<dir or id>[@revision]")
    parser.add_argument(
        "--prompt", action="append", required=True, help="a prompt; repeat for a batch"
    )
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int | None, default=None)
    parser.add_argument("--top_p", type=float | None, default=None)
    parser.add_argument("--seed", type=int | None, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string; repeatable")
    parser.add_argument("--tokenizer", type=str | None, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default="live", help=WEIGHTS_HELP)
    a = _parse(parser, args, "generate")
    model, tok, eos = load_model(a.ckpt, a.tokenizer, device=a.device, weights=a.weights)
    # a shell passes "\n" as two characters: read escapes, so --stop "\n\n" means a blank line
    stops = [codecs.decode(s, "unicode_escape") for s in a.stop]
    texts = complete(
        model, tok, a.prompt, eos, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed,
        stops, stop_at_eos=eos is not None,
    )  # fmt: skip
    for prompt, text in zip(a.prompt, texts, strict=True):
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
    from midtrain.configs import resolve_config

    if any(a in ("-h", "--help") for a in args):
        print(DEMO_USAGE)
        return
    experiment_main(["--config", str(resolve_config("configs/study/cpu.yaml")), *args])
