"""Journeys: every command on every kind of run, through the real ``midtrain`` command line.

A researcher validates, compares, exports and resumes a dozen branches a day, and the features
meet in those journeys. ``MATRIX`` is the one table of what each (run kind, command) cell does:
it works, or it is refused in one line that says what to do instead (a non-zero exit). Every
cell also checks that what it reads is byte-identical afterwards (the run, its parents, stores
and models): every file that existed is unchanged, and the only new files are the command's own
output (``<run>/validate/``, ``<run>/test/``, or an ``--out`` or new run directory outside the
run); a refused cell writes nothing at all. ``fit-resume`` is the one cell that writes into
its own run: it runs last for each kind, exits 0 (the run is finished) and leaves
``config.yaml`` and the checkpoints as they were.

Each kind is built once per module, on first use, through ``midtrain fit`` (tiny models, a few
steps). Commands run in this process (``midtrain.cli.main``), and Lightning's commands on a
2-process run in a fresh ``python -m midtrain`` (Lightning starts the second process from the
command line). Cells that need an optional extra are skipped where it is absent and run in the
tox env that installs it (markers ``needs_hf``, ``needs_eval``, ``needs_corpora``: tox -e
interop, tox -e corpora); the 2-process kinds are ``slow`` and run in tox -e journeys.

docs/journeys.md shows the table, rendered from ``MATRIX``; after a change to the table,
``python -m tests.test_journeys`` rewrites that part of the page (``test_docs_show_the_matrix``
fails until then).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch  # noqa: F401  imported before any test captures stderr (its log handler)
import pytest
import torch
import yaml

from tests.test_bad_input import error_line

REPO = Path(__file__).resolve().parents[1]

# -- the table ----------------------------------------------------------------------------------

# extra -> (the modules it provides, the pip extra that installs it)
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "hf": (("transformers", "safetensors"), "midtrain[hf]"),
    "eval": (("lm_eval", "transformers"), "midtrain[eval]"),
    "corpora": (("megatron.core",), "midtrain[corpora-test]"),
}


@dataclass(frozen=True)
class Kind:
    """A kind of run: what it is, the extra it needs, whether it takes 2 processes."""

    what: str
    needs: tuple[str, ...] = ()
    processes: int = 1


@dataclass(frozen=True)
class Command:
    """A command a researcher runs on a run (``CELL`` builds its command line): what it is,
    the extra it needs."""

    what: str
    needs: tuple[str, ...] = ()


KINDS: dict[str, Kind] = {
    "plain": Kind(
        "pretraining on three domains, one mixture (what the 1-process forks start from)"
    ),
    "switch": Kind("pretraining with a `MixtureSwitch` at step 3"),
    "ramp": Kind("a `MixtureSwitch` at step 2 with `ramp_steps: 3`"),
    "adaptive": Kind("`AdaptiveMixture` (`rule: thompson`) deciding every 2 steps"),
    "fork-keep": Kind(
        "`--fork` of `plain` at step 4 with a `MixtureSwitch` there and `model.lr_schedule: "
        "anneal`, `--fork_optimizer keep`"
    ),
    "fork-reset": Kind("the same anneal fork with `--fork_optimizer reset`"),
    "fork-fresh": Kind("the same anneal fork with `--fork_data fresh`"),
    "ema": Kind("pretraining with `midtrain.callbacks.EMA`"),
    "soup": Kind(
        "`midtrain average` of the last checkpoints of `fork-keep` and `fork-reset` (a file "
        "outside any run; its commands take `fork-keep`'s config.yaml)"
    ),
    "sft": Kind(
        "SFT (`midtrain.SFTDataModule`) with `model.init_from` the `switch` run's checkpoint"
    ),
    "hf-llama": Kind(
        "`model.init_from: hf:<dir>` of a GQA Llama with a Llama 3-style tokenizer (a BOS in "
        "front of every document), its store prepared with that tokenizer",
        ("hf",),
    ),
    "hf-qwen3": Kind(
        "`model.init_from: hf:<dir>` of a Qwen3 base (GQA, QK-norm), its store prepared with its "
        "tokenizer",
        ("hf",),
    ),
    "sequential": Kind(
        "a Megatron `.bin`/`.idx` domain written by megatron-core, `order: sequential` with "
        "`start_items`, beside an `.npy` domain",
        ("corpora",),
    ),
    "ddp": Kind("DDP on 2 processes with a `MixtureSwitch` and `AdaptiveMixture`", processes=2),
    "fsdp": Kind(
        "FSDP2 on 2 processes: an anneal fork with `--fork_optimizer reset` of an FSDP2 run",
        processes=2,
    ),
}

COMMANDS: dict[str, Command] = {
    "validate": Command(
        "`midtrain validate --config <run>/config.yaml --trainer.logger true --ckpt_path "
        "<run>/checkpoints/last.ckpt`, the run summary's `evaluate:` line"
    ),
    "test": Command("the same with `midtrain test`"),
    "validate-ema": Command("the same `midtrain validate` with `--weights ema`"),
    "validate-other-shape": Command(
        "`midtrain validate --config <a config of another model shape> --ckpt_path <ckpt>`"
    ),
    "export": Command("`midtrain export --ckpt <ckpt> --out <new dir>`", ("hf",)),
    "generate": Command("`midtrain generate --ckpt <ckpt> --prompt ... --max_new_tokens 4`"),
    "lm-eval": Command(
        "`midtrain lm-eval run --model midtrain --model_args checkpoint=<ckpt> --tasks <a local "
        "task> ...`",
        ("eval",),
    ),
    "average": Command("`midtrain average <two checkpoints of the run> --out <new file>`"),
    "init_from": Command(
        "a new run from its weights: `midtrain fit --config <the config the run was started "
        "with> --model.init_from <ckpt> --trainer.default_root_dir <new dir>`"
    ),
    "advise-check": Command("`midtrain advise --check <run>`"),
    "experiment": Command(
        "`midtrain experiment --config <study> --dry_run` for a study whose `pretrain.config` is "
        "`<run>/config.yaml`"
    ),
    "fit-other-run": Command(
        "`midtrain fit --config <another run>/config.yaml --trainer.default_root_dir <run> "
        "--ckpt_path last` (a soup: `--ckpt_path <soup>`, as below)"
    ),
    "fit-other-lr": Command(
        "`midtrain fit --config <run>/config.yaml --ckpt_path last --model.lr 0.5`"
    ),
    "fit-resume": Command(
        "`midtrain fit --config <run>/config.yaml --ckpt_path last`, after all the others"
    ),
}

# A cell is "works", or "refused: <pattern>": a regular expression searched in the command's one
# error line (here: words of the message, `.*` for the run's own values).
W = "works"
NO_EMA = "refused: has no averaged weights .*; use --weights live"
OTHER_SHAPE = (
    "refused: its model is not this config's .*; evaluate it with its own run's config.yaml"
)
NOT_A_STUDY = (
    "refused: has no finished study .*; run `midtrain experiment --config <study.yaml>` to the "
    "end first"
)
NOT_PRETRAINING = "refused: pretrain: the fit config needs `data: midtrain.MixtureDataModule`"
OTHER_SCHEDULE = (
    "refused: the checkpoint was trained with a different mixture schedule .*; to continue "
    "with a new schedule, start a new run with `midtrain fit --fork <ckpt>`"
)
OTHER_SETUP = (
    "refused: it was trained with another setup: .*; resume with the checkpoint's settings"
)
LR_CHANGED = "refused: another setup: model.lr.* -> 0.5; resume with the checkpoint's settings"
ANOTHER_MODEL = (
    "refused: holds the weights of another model .*; set model.arch and model.model_config to "
    "the model it was trained as"
)
SOUP_RESUMED = (
    "refused: it holds no training state to continue \\(a soup written by midtrain average\\); "
    "start a new run from its weights with --model.init_from"
)


def no_callback(name: str) -> str:
    return (
        f"refused: it holds the state of midtrain.callbacks.{name} .* but this run has no "
        f"midtrain.callbacks.{name}; resume with the same callback, or start a new run from it "
        "with --fork"
    )


# the cells of every kind but the exceptions below
COMMON: dict[str, str] = {
    "validate": W,
    "test": W,
    "validate-ema": NO_EMA,
    "validate-other-shape": OTHER_SHAPE,
    "export": W,
    "generate": W,
    "lm-eval": W,
    "average": W,
    "init_from": W,
    "advise-check": NOT_A_STUDY,
    "experiment": W,
    "fit-other-run": OTHER_SCHEDULE,
    "fit-other-lr": LR_CHANGED,
    "fit-resume": W,
}
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("ema", "validate-ema"): W,
    ("adaptive", "fit-other-run"): no_callback("AdaptiveMixture"),
    ("ema", "fit-other-run"): no_callback("EMA"),
    ("sft", "experiment"): NOT_PRETRAINING,
    ("sft", "fit-other-run"): OTHER_SETUP,
    ("hf-llama", "init_from"): ANOTHER_MODEL,
    ("hf-qwen3", "init_from"): ANOTHER_MODEL,
    ("soup", "fit-other-run"): SOUP_RESUMED,
    ("soup", "fit-other-lr"): SOUP_RESUMED,
    ("soup", "fit-resume"): SOUP_RESUMED,
}
MATRIX: dict[tuple[str, str], str] = {
    (kind, command): EXCEPTIONS.get((kind, command), COMMON[command])
    for kind in KINDS
    for command in COMMANDS
}


def needs(kind: str, command: str) -> list[str]:
    return sorted({*KINDS[kind].needs, *COMMANDS[command].needs})


# -- rendering the table for docs/journeys.md -----------------------------------------------------

PAGE = REPO / "docs" / "journeys.md"
BEGIN = "<!-- generated from MATRIX in tests/test_journeys.py: python -m tests.test_journeys -->"
END = "<!-- end of the generated part -->"


def _extras(names: list[str] | tuple[str, ...]) -> str:
    return " (needs " + ", ".join(f"`{EXTRAS[n][1]}`" for n in names) + ")" if names else ""


def _reason(outcome: str) -> str:
    """A refusal's pattern as the words of its message."""
    return outcome.removeprefix("refused: ").replace(".*", "…").replace("\\", "")


def _item(mark: str, text: str) -> str:
    """A list item of the page, wrapped at 100 characters."""
    return textwrap.fill(text, 100, initial_indent=mark, subsequent_indent=" " * len(mark),
                         break_long_words=False, break_on_hyphens=False)  # fmt: skip


def render_section() -> str:
    """The generated part of docs/journeys.md: the kinds, the commands, the table and the
    refusals, from ``KINDS``, ``COMMANDS`` and ``MATRIX``."""
    kinds = [_item("- ", f"`{k}`: {v.what}{_extras(v.needs)}") for k, v in KINDS.items()]
    commands = [_item("- ", f"`{c}`: {v.what}{_extras(v.needs)}") for c, v in COMMANDS.items()]
    reasons = list(dict.fromkeys(_reason(o) for o in MATRIX.values() if o != W))
    rows = [
        "| run kind | " + " | ".join(f"`{c}`" for c in COMMANDS) + " |",
        "|---" * (len(COMMANDS) + 1) + "|",
    ]
    for kind in KINDS:
        outcomes = [MATRIX[kind, c] for c in COMMANDS]
        cells = [
            "works" if o == W else f"refused ({reasons.index(_reason(o)) + 1})" for o in outcomes
        ]
        rows.append(f"| `{kind}` | " + " | ".join(cells) + " |")
    notes = [_item(f"{i}. ", f"`` {r} ``") for i, r in enumerate(reasons, 1)]
    return "\n".join(
        [BEGIN, "", "Run kinds:", "", *kinds, "", "Commands:", "", *commands, "", *rows, "",
         "Refused, in the message's own words (… for the run's own values):", "", *notes, "",
         END]
    )  # fmt: skip


def page_section(page: str) -> str:
    """The generated part of a page (from ``BEGIN`` to ``END``), or "" without one."""
    if BEGIN not in page or END not in page:
        return ""
    return page[page.index(BEGIN) : page.index(END) + len(END)]


def write_page() -> None:
    """Rewrite the generated part of docs/journeys.md from ``MATRIX``."""
    page = PAGE.read_text()
    old = page_section(page)
    if not old:
        raise SystemExit(f"{PAGE}: no generated part ({BEGIN} ... {END})")
    PAGE.write_text(page.replace(old, render_section()))
    print(f"{PAGE}: {'unchanged' if old == render_section() else 'table rewritten from MATRIX'}")


# -- building the runs -----------------------------------------------------------------------------

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64}
OTHER_TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 64}
STEPS = 6
FORK_STEP, FORK_STEPS = 4, 8


@dataclass
class Run:
    """A built run: its directory, the config commands read it with, its checkpoints."""

    kind: str
    dir: Path
    start: Path  # the config file it was started from (without fork options)
    config: Path  # what --config names to continue or evaluate it: its saved config.yaml
    ckpt: Path  # the checkpoint commands read
    ckpts: list[Path]  # two of its checkpoints, for `midtrain average`
    domains: list[str]
    reads: list[Path] = field(default_factory=list)  # all it is made of: parents, stores, models
    resume: str = "last"  # what --ckpt_path names to continue it (a soup: the soup's file)

    @property
    def roots(self) -> list[Path]:
        return [self.dir, *self.reads]

    @property
    def store(self) -> Path:
        return Path(yaml.safe_load(self.start.read_text())["data"]["init_args"]["store"])


def fit_yaml(
    path: Path,
    root: Path,
    store: Path,
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    callbacks: list[dict[str, Any]] | None = None,
    **trainer: Any,
) -> Path:
    """A tiny run's starting config: a checkpoint every 2 steps, all kept, one validation at
    the end."""
    steps = trainer.pop("max_steps", STEPS)
    cfg = {
        "seed_everything": 0,
        "model": model or {"arch": "tiny", "model_config": TINY, "lr": 1e-2, "warmup": 1},
        "data": data
        or {
            "class_path": "midtrain.MixtureDataModule",
            "init_args": {
                "store": str(store),
                "seq_len": 16,
                "micro_batch_size": 2,
                "val_max_blocks": 2,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": steps,
            "val_check_interval": steps,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "callbacks": callbacks or [],
            **trainer,
        },
        "checkpoint": {"every_n_train_steps": 2, "save_top_k": -1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def callback(name: str, **init_args: Any) -> dict[str, Any]:
    return {"class_path": f"midtrain.callbacks.{name}", "init_args": init_args}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    code: int
    out: str
    err: str


def midtrain(args: list[str], cwd: Path, fresh_process: bool, capsys: Any = None) -> Result:
    """``midtrain <args>``: in this process (``midtrain.cli.main``), or in a fresh one (what
    2-process runs need: Lightning starts the second process from the command line)."""
    if fresh_process:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        proc = subprocess.run(
            [sys.executable, "-m", "midtrain", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)
    from midtrain.cli import main

    saved = Path.cwd()
    os.chdir(cwd)
    try:
        if capsys is not None:
            capsys.readouterr()
        code = main(args)
        out, err = capsys.readouterr() if capsys is not None else ("", "")
    finally:
        os.chdir(saved)
    return Result(code, out, err)


def must(result: Result, what: str) -> Result:
    assert result.code == 0, f"{what}: exit {result.code}\n{result.err[-3000:]}"
    return result


class Runs:
    """Every run kind, built on first use (a kind's parents first) and kept for the module."""

    def __init__(self, root: Path, builtin_store: Path) -> None:
        self.root, self.builtin_store = root, builtin_store
        self.built: dict[str, Run] = {}
        self.failed: set[str] = set()
        self.cwd = root / "cwd"
        self.cwd.mkdir()

    def __getitem__(self, kind: str) -> Run:
        if kind in self.failed:
            pytest.fail(f"building {kind} failed (see its first cell)")
        if kind not in self.built:
            try:
                self.built[kind] = BUILDERS[kind](self, kind)
            except BaseException:
                self.failed.add(kind)
                raise
        return self.built[kind]

    def fit(self, kind: str, start: Path, *args: str, processes: int = 1) -> None:
        result = midtrain(["fit", "--config", str(start), *args], self.cwd, processes > 1)
        must(result, f"building {kind}")

    def run(
        self,
        kind: str,
        start: Path,
        domains: list[str],
        reads: list[Path],
        *args: str,
        processes: int = 1,
    ) -> Run:
        d = self.root / kind
        self.fit(kind, start, *args, processes=processes)
        ckpts = sorted((d / "checkpoints").glob("epoch=*"))
        return Run(
            kind,
            d,
            start,
            d / "config.yaml",
            d / "checkpoints" / "last.ckpt",
            [ckpts[0], d / "checkpoints" / "last.ckpt"],
            domains,
            reads,
        )

    @property
    def store_domains(self) -> list[str]:
        return ["prose", "code", "math"]


def build_plain(runs: Runs, kind: str) -> Run:
    start = fit_yaml(runs.root / f"{kind}.yaml", runs.root / kind, runs.builtin_store)
    return runs.run(kind, start, runs.store_domains, [runs.builtin_store])


def build_switch(runs: Runs, kind: str) -> Run:
    switch = callback("MixtureSwitch", step=3, weights={"prose": 0.2, "code": 0.4, "math": 0.4})
    start = fit_yaml(
        runs.root / f"{kind}.yaml", runs.root / kind, runs.builtin_store, callbacks=[switch]
    )
    return runs.run(kind, start, runs.store_domains, [runs.builtin_store])


def build_ramp(runs: Runs, kind: str) -> Run:
    ramp = callback("MixtureSwitch", step=2, weights={"prose": 0.3, "code": 0.7}, ramp_steps=3)
    start = fit_yaml(
        runs.root / f"{kind}.yaml", runs.root / kind, runs.builtin_store, callbacks=[ramp]
    )
    return runs.run(kind, start, runs.store_domains, [runs.builtin_store])


def build_adaptive(runs: Runs, kind: str) -> Run:
    adaptive = callback(
        "AdaptiveMixture", rule="thompson", every_n_steps=2, floor=0.1, step_size=2.0
    )
    start = fit_yaml(
        runs.root / f"{kind}.yaml", runs.root / kind, runs.builtin_store, callbacks=[adaptive]
    )
    return runs.run(kind, start, runs.store_domains, [runs.builtin_store])


FORK_OPTIONS = {
    "fork-keep": ["--fork_optimizer", "keep"],
    "fork-reset": ["--fork_optimizer", "reset"],
    "fork-fresh": ["--fork_data", "fresh"],
}


def build_fork(runs: Runs, kind: str) -> Run:
    parent = runs["plain"]
    switch = callback("MixtureSwitch", step=FORK_STEP, weights={"prose": 0.5, "code": 0.5})
    start = fit_yaml(
        runs.root / f"{kind}.yaml",
        runs.root / kind,
        runs.builtin_store,
        callbacks=[switch],
        max_steps=FORK_STEPS,
    )
    point = parent.dir / "checkpoints" / f"epoch=0-step={FORK_STEP}.ckpt"
    fork = ["--fork", str(point), *FORK_OPTIONS[kind], "--model.lr_schedule", "anneal"]
    return runs.run(kind, start, runs.store_domains, [parent.dir, runs.builtin_store], *fork)


def build_ema(runs: Runs, kind: str) -> Run:
    start = fit_yaml(
        runs.root / f"{kind}.yaml",
        runs.root / kind,
        runs.builtin_store,
        callbacks=[callback("EMA", decay=0.7)],
    )
    return runs.run(kind, start, runs.store_domains, [runs.builtin_store])


def build_soup(runs: Runs, kind: str) -> Run:
    keep, reset = runs["fork-keep"], runs["fork-reset"]
    d = runs.root / kind
    d.mkdir()
    soup = d / "soup.ckpt"
    must(midtrain(["average", str(keep.ckpt), str(reset.ckpt), "--out", str(soup)], runs.cwd, False),
         "building soup")  # fmt: skip
    return Run(
        kind,
        d,
        keep.start,
        keep.config,
        soup,
        [soup, reset.ckpt],
        keep.domains,
        [keep.dir, reset.dir, *keep.reads],
        resume=str(soup),
    )


QA = [{"q": f"What is {i} plus {i}?", "a": f"It is {2 * i}."} for i in range(40)]


def build_sft(runs: Runs, kind: str) -> Run:
    from midtrain.data.prepare import DomainConfig, PrepareConfig, TokenizerConfig, prepare

    parent = runs["switch"]
    src = runs.root / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in QA))
    store = Path(
        prepare(
            PrepareConfig(
                output=str(runs.root / "sft-store"),
                domains={
                    "qa": DomainConfig(
                        source={"path": str(src)},
                        prompt="Q: {q}\nA: ",
                        response="{a}",
                        mask_prompt=True,
                        val_fraction=0.1,
                    )
                },
                tokenizer=TokenizerConfig(path=str(runs.builtin_store / "tokenizer.json")),
            )
        )
    )
    data = {
        "class_path": "midtrain.SFTDataModule",
        "init_args": {
            "store": str(store),
            "target": "qa",
            "general_store": str(runs.builtin_store),
            "general_val_sets": ["prose"],
            "max_length": 48,
            "micro_batch_size": 2,
            "packing": True,
            "val_max_examples": 4,
            "general_val_max_blocks": 2,
        },
    }
    model = {"arch": "tiny", "model_config": TINY, "lr": 1e-3, "warmup": 1,
             "init_from": str(parent.ckpt)}  # fmt: skip
    start = fit_yaml(
        runs.root / f"{kind}.yaml", runs.root / kind, store, model=model, data=data, max_steps=4
    )
    return runs.run(kind, start, ["qa"], [parent.dir, store, runs.builtin_store])


def hf_store(runs: Runs, kind: str, model_dir: Path) -> Path:
    """A store prepared with the model's own tokenizer (``tokenizer.hub: hf:<dir>``)."""
    cfg = {
        "output": str(runs.root / f"{kind}-store"),
        "tokenizer": {"hub": f"hf:{model_dir}"},
        "domains": {
            "prose": {"source": {"builtin": "python-docs"}, "max_docs": 40, "val_fraction": 0.1},
            "code": {"source": {"builtin": "python-stdlib"}, "max_docs": 20, "val_fraction": 0.1},
        },
    }
    path = runs.root / f"{kind}-prepare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    must(midtrain(["prepare", "--config", str(path)], runs.cwd, False), f"preparing {kind}")
    return runs.root / f"{kind}-store"


def build_hf(runs: Runs, kind: str) -> Run:
    from tests.test_interop import llama3_model, random_hf_model

    model_dir = runs.root / f"{kind}-model"
    if kind == "hf-llama":
        llama3_model(model_dir)
    else:
        random_hf_model("qwen3", model_dir, runs.builtin_store)
    store = hf_store(runs, kind, model_dir)
    model = {"init_from": f"hf:{model_dir}", "lr": 1e-3, "warmup": 1}
    start = fit_yaml(runs.root / f"{kind}.yaml", runs.root / kind, store, model=model)
    return runs.run(kind, start, ["prose", "code"], [store, model_dir])


def build_sequential(runs: Runs, kind: str) -> Run:
    from tests.corpora import items, tokenizer_and_documents, write_megatron, write_npy

    d = runs.root / "corpus"
    d.mkdir()
    tokenizer, docs = tokenizer_and_documents(d, n_prose=60, n_code=10)
    write_megatron(d / "pile", items(docs["prose"], 17))
    write_npy(d / "web.npy", docs["prose"][::-1])
    cfg = {
        "output": str(runs.root / "sequential-store"),
        "tokenizer": {"path": str(tokenizer)},
        "domains": {
            "pile": {
                "source": {"format": "megatron", "path": str(d / "pile")},
                "val_fraction": 0,
                "order": "sequential",
            },
            "web": {
                "source": {"format": "npy", "path": str(d / "web.npy"), "dtype": "uint16"},
                "val_fraction": 0.1,
            },
        },
    }
    path = runs.root / "sequential-prepare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    must(midtrain(["prepare", "--config", str(path)], runs.cwd, False), "preparing sequential")
    store = runs.root / "sequential-store"
    data = {
        "class_path": "midtrain.MixtureDataModule",
        "init_args": {
            "store": str(store),
            "seq_len": 16,
            "micro_batch_size": 2,
            "val_max_blocks": 2,
            "weights": {"pile": 0.5, "web": 0.5},
            "start_items": {"pile": 10},
        },
    }
    start = fit_yaml(runs.root / f"{kind}.yaml", runs.root / kind, store, data=data)
    return runs.run(kind, start, ["pile", "web"], [store, d])


def build_ddp(runs: Runs, kind: str) -> Run:
    callbacks = [
        callback("MixtureSwitch", step=2, weights={"prose": 0.4, "code": 0.3, "math": 0.3}),
        callback("AdaptiveMixture", rule="excess_loss", every_n_steps=2, start_step=2,
                 reference={"prose": 5.0, "code": 5.0, "math": 5.0}),
    ]  # fmt: skip
    start = fit_yaml(
        runs.root / f"{kind}.yaml",
        runs.root / kind,
        runs.builtin_store,
        callbacks=callbacks,
        devices=2,
        strategy="ddp",
    )
    cfg = yaml.safe_load(start.read_text())
    cfg["data"]["init_args"]["micro_batch_size"] = 1  # the global batch of 2, as the others
    start.write_text(yaml.safe_dump(cfg))
    return runs.run(kind, start, runs.store_domains, [runs.builtin_store], processes=2)


FSDP2 = {
    "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
    "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
}


def fsdp_config(start: Path) -> Path:
    """The start config on 2 processes with FSDP2, at the others' global batch of 2."""
    cfg = yaml.safe_load(start.read_text())
    cfg["trainer"].update(devices=2, strategy=FSDP2)
    cfg["data"]["init_args"]["micro_batch_size"] = 1
    start.write_text(yaml.safe_dump(cfg))
    return start


def build_fsdp_parent(runs: Runs, kind: str) -> Run:
    """What the FSDP2 branch forks from: plain pretraining on 2 processes with FSDP2."""
    start = fit_yaml(runs.root / f"{kind}.yaml", runs.root / kind, runs.builtin_store)
    return runs.run(kind, fsdp_config(start), runs.store_domains, [runs.builtin_store], processes=2)


def build_fsdp(runs: Runs, kind: str) -> Run:
    parent = runs["fsdp-parent"]
    switch = callback("MixtureSwitch", step=FORK_STEP, weights={"prose": 0.5, "code": 0.5})
    start = fit_yaml(
        runs.root / f"{kind}.yaml",
        runs.root / kind,
        runs.builtin_store,
        callbacks=[switch],
        max_steps=FORK_STEPS,
    )
    fsdp_config(start)
    point = parent.dir / "checkpoints" / f"epoch=0-step={FORK_STEP}.ckpt"
    fork = ["--fork", str(point), "--fork_optimizer", "reset", "--model.lr_schedule", "anneal"]
    return runs.run(
        kind, start, runs.store_domains, [parent.dir, runs.builtin_store], *fork, processes=2
    )


BUILDERS: dict[str, Callable[[Runs, str], Run]] = {
    "plain": build_plain,
    "switch": build_switch,
    "ramp": build_ramp,
    "adaptive": build_adaptive,
    "fork-keep": build_fork,
    "fork-reset": build_fork,
    "fork-fresh": build_fork,
    "ema": build_ema,
    "soup": build_soup,
    "sft": build_sft,
    "hf-llama": build_hf,
    "hf-qwen3": build_hf,
    "sequential": build_sequential,
    "ddp": build_ddp,
    "fsdp": build_fsdp,
    "fsdp-parent": build_fsdp_parent,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, builtin_store: Path) -> Runs:
    if module_available("lm_eval"):
        # lm-eval's log handler keeps the stderr it first sees: pytest's, not one test's capsys
        from lm_eval.utils import setup_logging

        setup_logging()
    return Runs(tmp_path_factory.mktemp("journeys"), builtin_store)


# -- the commands ----------------------------------------------------------------------------------


@dataclass
class Cell:
    """One command on one run: its arguments, where it may write, and what it must leave."""

    args: list[str]
    outputs: list[Path]  # where new files may appear (the command's own output)
    roots: list[Path]  # what it reads and must leave as it was
    check: Callable[[Result], None] | None = None  # what it must have done, when it works
    trainer: bool = True  # a Lightning command (2-process runs need a fresh process)


TASK = """task: journeys_arith
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def write_task(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = [
        {"question": f"{a} + 1 =", "choices": [str(a + 1), str(a + 2)], "label": 0}
        for a in range(4)
    ]
    data = directory / "arith.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "arith.yaml").write_text(TASK.format(data=data))
    return directory


def other_shape_config(runs: Runs, inputs: Path) -> Path:
    plain = runs["plain"]
    cfg = yaml.safe_load(plain.start.read_text())
    cfg["model"]["model_config"] = OTHER_TINY
    cfg["trainer"]["default_root_dir"] = str(inputs / "other-shape")
    path = inputs / "other-shape.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def study_yaml(run: Run, inputs: Path, out: Path) -> Path:
    """A study whose pretraining is the run's config: a branch to its last domain from step 1,
    SFT on that domain."""
    sft = inputs / "sft.yaml"
    data = {"store": str(run.store), "target": run.domains[-1]}
    sft.write_text(yaml.safe_dump({"data": {"class_path": "midtrain.SFTDataModule",
                                            "init_args": data}}))  # fmt: skip
    study = {
        "output": str(out / "study"),
        "general": run.domains[0],
        "pretrain": {"config": [str(run.config)]},
        "branches": {"mid": {"switch": {"step": 1, "weights": {run.domains[-1]: 1.0}}}},
        "sft": {"config": [str(sft)], "targets": {"t": data}, "lrs": [1e-3]},
    }
    path = inputs / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def evaluations(where: Path) -> list[Path]:
    """An evaluation's directory, or a later one's (``<dir>-2``, ...)."""
    return [where, *(where.with_name(f"{where.name}-{n}") for n in range(2, 10))]


def printed(text: str) -> Callable[[Result], None]:
    def check(result: Result) -> None:
        assert text in result.out, result.out[-2000:]

    return check


def wrote(path: Path | Callable[[], Path]) -> Callable[[Result], None]:
    def check(result: Result) -> None:
        found = path() if callable(path) else path
        assert found.exists(), found  # a file, or a sharded checkpoint's directory

    return check


@dataclass
class Place:
    """Where a cell runs: the runs, its kind's run, a directory for the files it is given
    (``inputs``) and a new one for its outputs outside the run (``out``)."""

    runs: Runs
    kind: str
    inputs: Path
    out: Path

    @property
    def run(self) -> Run:
        return self.runs[self.kind]


def evaluation(p: Place, command: str, *extra: str) -> Cell:
    """The run summary's ``evaluate:`` line (a soup, outside any run: with its own directory)."""
    run = p.run
    args = [command, "--config", str(run.config), "--trainer.logger", "true"]
    args += ["--ckpt_path", str(run.ckpt), *extra]
    if run.ckpt.parent.name == "checkpoints":
        where = evaluations(run.dir / command)
    else:
        where = [p.out / "eval"]
        args += ["--trainer.default_root_dir", str(where[0])]
    return Cell(args, where, run.roots, printed(f"{'test' if command == 'test' else 'val'}/loss"))


def lm_eval(p: Place) -> Cell:
    tasks, results = write_task(p.inputs / "tasks"), p.out / "results"
    args = ["lm-eval", "run", "--model", "midtrain", "--model_args",
            f"checkpoint={p.run.ckpt},batch_size=4", "--tasks", "journeys_arith",
            "--include_path", str(tasks), "--device", "cpu", "--output_path", str(results)]  # fmt: skip
    first = lambda: next(results.rglob("results_*.json"), results / "results_*.json")  # noqa: E731
    return Cell(args, [], p.run.roots, wrote(first), trainer=False)


def init_from(p: Place) -> Cell:
    new = p.out / "new"
    args = ["fit", "--config", str(p.run.start), "--model.init_from", str(p.run.ckpt),
            "--trainer.default_root_dir", str(new), "--trainer.limit_val_batches", "0"]  # fmt: skip
    return Cell(args, [], p.run.roots, wrote(new / "checkpoints" / "last.ckpt"))


def fit_other_run(p: Place) -> Cell:
    """Another run's config with this run's directory: what a copy-pasted command does."""
    other = p.runs["switch" if p.kind == "plain" else "plain"]
    args = ["fit", "--config", str(other.config), "--trainer.default_root_dir", str(p.run.dir),
            "--ckpt_path", p.run.resume]  # fmt: skip
    return Cell(args, [], [*p.run.roots, other.dir])


def experiment(p: Place) -> Cell:
    study = study_yaml(p.run, p.inputs, p.out)
    args = ["experiment", "--config", str(study), "--dry_run"]
    return Cell(args, [], p.run.roots, printed("branch mid:"), trainer=False)


def validate_other_shape(p: Place) -> Cell:
    config = other_shape_config(p.runs, p.inputs)
    return Cell(
        ["validate", "--config", str(config), "--ckpt_path", str(p.run.ckpt)], [], p.run.roots
    )


def export(p: Place) -> Cell:
    args = ["export", "--ckpt", str(p.run.ckpt), "--out", str(p.out / "hf")]
    return Cell(args, [], p.run.roots, wrote(p.out / "hf" / "config.json"), trainer=False)


def generate(p: Place) -> Cell:
    prompt = "def add(a, b):"
    args = ["generate", "--ckpt", str(p.run.ckpt), "--prompt", prompt, "--max_new_tokens", "4"]
    return Cell(args, [], p.run.roots, printed(prompt), trainer=False)


def average(p: Place) -> Cell:
    args = ["average", *map(str, p.run.ckpts), "--out", str(p.out / "soup.ckpt")]
    return Cell(args, [], p.run.roots, wrote(p.out / "soup.ckpt"), trainer=False)


def fit(p: Place, *extra: str, reads_only: bool = True) -> Cell:
    """``midtrain fit --config <run>/config.yaml --ckpt_path last``; ``reads_only=False``: the
    resume of the finished run, which may write into it (its parents and stores it only
    reads)."""
    args = ["fit", "--config", str(p.run.config), "--ckpt_path", p.run.resume, *extra]
    return Cell(args, [], p.run.roots if reads_only else p.run.reads)


CELL: dict[str, Callable[[Place], Cell]] = {
    "validate": lambda p: evaluation(p, "validate"),
    "test": lambda p: evaluation(p, "test"),
    "validate-ema": lambda p: evaluation(p, "validate", "--weights", "ema"),
    "validate-other-shape": validate_other_shape,
    "export": export,
    "generate": generate,
    "lm-eval": lm_eval,
    "average": average,
    "init_from": init_from,
    "advise-check": lambda p: Cell(
        ["advise", "--check", str(p.run.dir)], [], p.run.roots, trainer=False
    ),
    "experiment": experiment,
    "fit-other-run": fit_other_run,
    "fit-other-lr": lambda p: fit(p, "--model.lr", "0.5"),
    "fit-resume": lambda p: fit(p, reads_only=False),
}


# -- the cells ------------------------------------------------------------------------------------

Snapshot = dict[str, tuple[Any, ...]]


def snapshot(roots: list[Path]) -> Snapshot:
    """Every file and directory under ``roots``: files by size and sha256 (their bytes)."""
    out: Snapshot = {}
    for root in dict.fromkeys(roots):
        for p in sorted(root.rglob("*")) if root.is_dir() else []:
            if p.is_dir():
                out[str(p)] = ("dir",)
            else:
                out[str(p)] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def check_untouched(before: Snapshot, after: Snapshot, outputs: list[Path]) -> None:
    """Every file that existed is unchanged; new files only under ``outputs``."""
    changed = sorted(k for k in before if before[k] != after.get(k))
    assert changed == [], f"changed or removed: {changed}"
    new = sorted(k for k in set(after) - set(before))
    stray = [k for k in new if not any(Path(k).is_relative_to(o) for o in outputs)]
    assert stray == [], f"new files outside the command's own output: {stray}"


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def missing_extra(kind: str, command: str) -> str | None:
    for extra in needs(kind, command):
        modules, install = EXTRAS[extra]
        absent = [m for m in modules if not module_available(m)]
        if absent:
            return f"needs {install} ({', '.join(absent)} not installed)"
    return None


def marks(kind: str, command: str) -> list[Any]:
    out: list[Any] = [getattr(pytest.mark, f"needs_{e}") for e in needs(kind, command)]
    reason = missing_extra(kind, command)
    if reason:
        out.append(pytest.mark.skip(reason=reason))
    if KINDS[kind].processes > 1:
        out.append(pytest.mark.slow)
    return out


CELLS = [
    pytest.param(kind, command, id=f"{kind}-{command}", marks=marks(kind, command))
    for kind in KINDS
    for command in COMMANDS
]


@pytest.mark.parametrize(("kind", "command"), CELLS)
def test_journey(
    kind: str, command: str, runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected, run = MATRIX[kind, command], runs[kind]
    inputs, out, cwd = tmp_path / "inputs", tmp_path / "out", tmp_path / "cwd"
    inputs.mkdir()
    cwd.mkdir()
    c = CELL[command](Place(runs, kind, inputs, out))
    # a refused command writes nothing, not even into the run it would continue
    roots = c.roots if expected == W else [*run.roots, *c.roots]
    before = snapshot(roots)
    own = snapshot([run.dir / "checkpoints"]), run.config.read_bytes()
    fresh = c.trainer and KINDS[kind].processes > 1
    result = midtrain(c.args, cwd, fresh, None if fresh else capsys)
    after = snapshot(roots)
    assert list(cwd.iterdir()) == [], "the command wrote into the working directory"
    if expected == W:
        assert result.code == 0, f"exit {result.code}: {result.err[-3000:]}"
        assert "Traceback" not in result.err, result.err[-3000:]
        if c.check is not None:
            c.check(result)
        check_untouched(before, after, c.outputs)
        # fit-resume: the finished run's config.yaml and checkpoints stay as they were
        assert (snapshot([run.dir / "checkpoints"]), run.config.read_bytes()) == own
        return
    pattern = expected.removeprefix("refused: ")
    assert result.code != 0, f"expected a refusal ({pattern}), got exit 0:\n{result.out[-2000:]}"
    line = error_line(result.err, c.args[0])
    assert re.search(pattern, line), line
    check_untouched(before, after, [])
    assert not out.exists(), "a refused command wrote its output"


def test_docs_show_the_matrix() -> None:
    """docs/journeys.md holds the table rendered from ``MATRIX``, word for word."""
    assert page_section(PAGE.read_text()) == render_section(), (
        "docs/journeys.md's table is not MATRIX's; rewrite it with `python -m tests.test_journeys`"
    )


# -- journeys beside the matrix ---------------------------------------------------------------------

EVALUATIONS = shutil.ignore_patterns("validate*", "test*")


def test_evaluation_given_its_run_directory_writes_beside_the_record(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/midtraining.md validates an EMA run with ``--trainer.default_root_dir <the run>``:
    that evaluates into ``<run>/validate/``; the run's config.yaml still continues it."""
    run = tmp_path / "ema"
    shutil.copytree(runs["ema"].dir, run, ignore=EVALUATIONS)  # the run as fit left it
    before = snapshot([run])
    args = ["validate", "--config", str(runs["ema"].start), "--trainer.default_root_dir",
            str(run), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--weights", "ema"]  # fmt: skip
    must(midtrain(args, tmp_path, False, capsys), "validate")
    check_untouched(before, snapshot([run]), [run / "validate"])
    assert (run / "validate" / "config.yaml").is_file()


def test_a_second_evaluation_keeps_the_first(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The summary's evaluate line, then the same with ``--weights ema``: the second writes to
    ``<run>/validate-2/``; the first's config.yaml and summary stay as it wrote them."""
    run = tmp_path / "ema"
    shutil.copytree(runs["ema"].dir, run, ignore=EVALUATIONS)  # the run as fit left it
    args = ["validate", "--config", str(run / "config.yaml"), "--trainer.logger", "true",
            "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]  # fmt: skip
    must(midtrain(args, tmp_path, False, capsys), "validate")
    first = snapshot([run])
    must(midtrain([*args, "--weights", "ema"], tmp_path, False, capsys), "validate --weights ema")
    check_untouched(first, snapshot([run]), [run / "validate-2"])
    assert yaml.safe_load((run / "validate" / "config.yaml").read_text())["weights"] == "live"
    assert yaml.safe_load((run / "validate-2" / "config.yaml").read_text())["weights"] == "ema"


def test_a_soup_is_not_forked_either(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--fork <soup>``: one line pointing at ``--model.init_from``, nothing written."""
    soup = runs["soup"]
    before = snapshot(soup.roots)
    new = tmp_path / "branch"
    args = ["fit", "--config", str(soup.start), "--fork", str(soup.ckpt),
            "--trainer.default_root_dir", str(new)]  # fmt: skip
    result = midtrain(args, tmp_path, False, capsys)
    assert result.code == 2
    assert re.search(SOUP_RESUMED.removeprefix("refused: "), error_line(result.err, "fit"))
    check_untouched(before, snapshot(soup.roots), [])
    assert not new.exists()


def test_init_from_another_model_is_one_line_before_anything_is_written(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new run from a checkpoint of another shape: one line naming the fields that differ;
    no run directory is made (it was, with an events file, before the weights failed to load)."""
    plain = runs["plain"]
    config = other_shape_config(runs, tmp_path)
    new = tmp_path / "new"
    args = ["fit", "--config", str(config), "--model.init_from", str(plain.ckpt),
            "--trainer.default_root_dir", str(new)]  # fmt: skip
    result = midtrain(args, tmp_path, False, capsys)
    line = error_line(result.err, "fit")
    assert result.code == 2 and "(n_layer 1 -> 2)" in line, line
    assert re.search(ANOTHER_MODEL.removeprefix("refused: "), line)
    assert not new.exists()


@pytest.mark.slow
def test_fsdp2_anneal_reset_fork_starts_as_on_one_process(runs: Runs, tmp_path: Path) -> None:
    """The FSDP2 branch (anneal, ``--fork_optimizer reset``, from a sharded checkpoint, whose
    optimizer the strategy restores in place) has the learning rates of the same fork on one
    process (``fork-reset``), and AdamW starts afresh: two updates after the fork its step
    count is 2 (a kept optimizer's, as ``fork-keep``'s, is 6)."""
    from midtrain.checkpoint.files import consolidate
    from tests.test_training import scalars

    fsdp, reset, keep = runs["fsdp"], runs["fork-reset"], runs["fork-keep"]
    lrs = {k: dict(scalars(r.dir)["train/lr"]) for k, r in (("fsdp", fsdp), ("reset", reset))}
    assert min(lrs["fsdp"]) == FORK_STEP and lrs["fsdp"] == pytest.approx(lrs["reset"], rel=1e-6)
    after = f"epoch=0-step={FORK_STEP + 2}.ckpt"
    full = consolidate(fsdp.dir / "checkpoints" / after, tmp_path / "fsdp.ckpt")
    sharded = torch.load(full, map_location="cpu", weights_only=True)["optimizer_0"]["state"]
    kept = torch.load(keep.dir / "checkpoints" / after, map_location="cpu", weights_only=True)
    assert len(sharded) > 0 and {float(s["step"]) for s in sharded.values()} == {2.0}
    assert {float(s["step"]) for s in kept["optimizer_states"][0]["state"].values()} == {6.0}


if __name__ == "__main__":
    write_page()
