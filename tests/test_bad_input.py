"""Bad input to `midtrain prepare` and `midtrain fit`: a one-line error naming the key or file
(no traceback unless MIDTRAIN_TRACEBACK is set), exit code 2, and no existing store or
checkpoint touched."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from midtrain.cli import main

Snapshot = dict[str, tuple[Any, ...]]


# -- helpers ---------------------------------------------------------------------------------


def snapshot(*roots: Path) -> Snapshot:
    """Every file and directory under ``roots``: files by (size, mtime_ns, sha256)."""
    out: Snapshot = {}
    for root in roots:
        assert root.is_dir(), root
        for p in sorted(root.rglob("*")):
            if p.is_dir():
                out[str(p)] = ("dir",)
            else:
                st = p.stat()
                out[str(p)] = (
                    st.st_size,
                    st.st_mtime_ns,
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                )
    return out


def assert_untouched(before: Snapshot, after: Snapshot) -> None:
    assert sorted(set(after) - set(before)) == [], "new files appeared"
    assert sorted(set(before) - set(after)) == [], "files disappeared"
    changed = [k for k in before if before[k] != after[k]]
    assert changed == [], "files changed"


def error_line(err: str, command: str) -> str:
    """The single `midtrain <command>: error: ...` line of stderr (no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("midtrain")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"midtrain {command}: error: "), lines[0]
    assert sum("error:" in line for line in err.splitlines()) == 1, err
    return lines[0]


def run_bad(capsys: pytest.CaptureFixture, args: list[str], roots: list[Path]) -> str:
    """Run ``midtrain <args>`` in-process; check exit code 2, one error line, nothing touched."""
    before = snapshot(*roots)
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = error_line(err, args[0])
    assert_untouched(before, snapshot(*roots))
    return line


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- an existing store (built by `midtrain prepare`) and an existing run (by `midtrain fit`) --


@dataclass
class Prepared:
    dir: Path
    store: Path
    config: dict[str, Any]

    def bad_config(self, tmp_path: Path, change: Any) -> Path:
        cfg = copy.deepcopy(self.config)
        change(cfg)
        return write_yaml(tmp_path / "bad-prepare.yaml", cfg)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, builtin_store: Path) -> Prepared:
    """A store with a normal domain `docs` and a domain `tiny` too short for one sequence."""
    d = tmp_path_factory.mktemp("prepared")
    docs = write_jsonl(
        d / "docs.jsonl",
        [
            {
                "text": f"Document {i}: the quick brown fox jumps over {i % 7} lazy dogs. " * 4,
                "id": i,
            }
            for i in range(200)
        ],
    )
    tiny = write_jsonl(d / "tiny.jsonl", [{"text": "Hi."}])
    config = {
        "output": str(d / "store"),
        "tokenizer": {"path": str(builtin_store / "tokenizer.json")},
        "domains": {
            "docs": {"source": {"path": str(docs)}, "val_fraction": 0.1},
            "tiny": {"source": {"path": str(tiny)}, "val_fraction": 0.0},
        },
    }
    assert main(["prepare", "--config", str(write_yaml(d / "prepare.yaml", config))]) == 0
    assert (d / "store" / "store.json").is_file()
    return Prepared(d, d / "store", config)


@dataclass
class Run:
    config: Path
    dir: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, builtin_store: Path) -> Run:
    """A real (2-step) run of the tiny model on the built-in store, with its checkpoints."""
    d = tmp_path_factory.mktemp("run")
    cfg = {
        "seed_everything": 0,
        "model": {
            "arch": "tiny",
            "model_config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64},
        },
        "data": {
            "class_path": "midtrain.MixtureDataModule",
            "init_args": {
                "store": str(builtin_store),
                "seq_len": 32,
                "micro_batch_size": 2,
                "val_max_blocks": 2,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "default_root_dir": str(d / "run"),
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
        },
    }
    config = write_yaml(d / "fit.yaml", cfg)
    assert main(["fit", "--config", str(config), "--trainer.max_steps", "2"]) == 0
    assert (d / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (d / "run" / "config.yaml").is_file()
    return Run(config, d / "run")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory either
    monkeypatch.delenv("MIDTRAIN_TRACEBACK", raising=False)


# -- prepare ---------------------------------------------------------------------------------


def _set(*keys: str, value: Any) -> Any:
    def change(cfg: dict[str, Any]) -> None:
        for k in keys[:-1]:
            cfg = cfg[k]
        cfg[keys[-1]] = value

    return change


def _update(*keys: str, **values: Any) -> Any:
    def change(cfg: dict[str, Any]) -> None:
        for k in keys:
            cfg = cfg[k]
        cfg.update(values)

    return change


PREPARE_CASES = [
    # id, change to the good config, expected text ({tmp} is the test's tmp_path)
    (
        "source-file-missing",
        _set("domains", "docs", "source", value={"path": "{tmp}/missing.jsonl"}),
        "domains.docs.source.path: file not found: {tmp}/missing.jsonl",
    ),
    (
        "source-data-files-missing",
        _set(
            "domains", "docs", "source", value={"path": "json", "data_files": "{tmp}/missing.jsonl"}
        ),
        "domains.docs.source.data_files: file not found: {tmp}/missing.jsonl",
    ),
    (
        "template-field-missing",
        _set("domains", "docs", "text", value="Q: {question}"),
        "domains.docs: template field {question} is not in the records (fields: id, text)",
    ),
    (
        "prompt-field-missing",
        _update("domains", "docs", prompt="{instruction}\n", response="{text}"),
        "domains.docs: template field {instruction} is not in the records",
    ),
    (
        "unknown-key-in-domain",
        _set("domains", "docs", "max_doc", value=10),
        "Option 'max_doc' is not accepted",
    ),
    (
        "unknown-key-in-tokenizer",
        _set("tokenizer", "vocab", value=300),
        "Group 'tokenizer' does not accept option 'vocab'",
    ),
    ("unknown-top-level-key", _set("outptu", value="x"), "Option 'outptu' is not accepted"),
    (
        "unknown-builtin",
        _set("domains", "docs", "source", value={"builtin": "poetry"}),
        "domains.docs.source.builtin: unknown builtin source 'poetry'",
    ),
    (
        "tokenizer-file-missing",
        _set("tokenizer", "path", value="{tmp}/missing-tokenizer.json"),
        "tokenizer.path: file not found: {tmp}/missing-tokenizer.json",
    ),
    ("no-domains", _set("domains", value={}), "domains: the prepare config names no domains"),
    (
        "no-tokenizer",
        _set("tokenizer", value={}),
        "tokenizer: give exactly one of `path`, `hub` or `train`",
    ),
]


def _fill(value: Any, **places: Path) -> Any:
    if isinstance(value, str):
        for k, v in places.items():
            value = value.replace("{" + k + "}", str(v))
        return value
    if isinstance(value, dict):
        return {k: _fill(v, **places) for k, v in value.items()}
    return value


@pytest.mark.parametrize(
    ("change", "expected"), [c[1:] for c in PREPARE_CASES], ids=[c[0] for c in PREPARE_CASES]
)
def test_prepare_bad_config(
    change: Any,
    expected: str,
    prepared: Prepared,
    builtin_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    def filled(cfg: dict[str, Any]) -> None:
        change(cfg)
        cfg.update(_fill(cfg, tmp=tmp_path))

    config = prepared.bad_config(tmp_path, filled)
    line = run_bad(capsys, ["prepare", "--config", str(config)], [prepared.dir, builtin_store])
    assert _fill(expected, tmp=tmp_path) in line


def test_prepare_missing_config_file(
    prepared: Prepared, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "no-such-prepare.yaml"
    line = run_bad(capsys, ["prepare", "--config", str(missing)], [prepared.dir])
    assert f"File does not exist: '{missing}'" in line


def test_prepare_empty_domain_leaves_store_untouched(
    prepared: Prepared, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # `more` is new and gets built first; `blank` renders to nothing. The failed rebuild must
    # not swap `more` in, nor change the index, tokenizer or the reused domains.
    more = write_jsonl(tmp_path / "more.jsonl", [{"text": f"more text {i}"} for i in range(30)])
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""} for _ in range(5)])

    def change(cfg: dict[str, Any]) -> None:
        cfg["domains"]["more"] = {"source": {"path": str(more)}}
        cfg["domains"]["blank"] = {"source": {"path": str(blank)}}

    config = prepared.bad_config(tmp_path, change)
    line = run_bad(capsys, ["prepare", "--config", str(config)], [prepared.dir])
    assert "domains.blank: empty domain: the source gave no documents" in line
    assert not (prepared.store / "more").exists()
    assert not list(prepared.store.glob(".staging-*"))


def test_prepare_empty_file_is_an_empty_domain(
    prepared: Prepared, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    config = prepared.bad_config(
        tmp_path, _set("domains", "empty", value={"source": {"path": str(empty)}})
    )
    line = run_bad(capsys, ["prepare", "--config", str(config)], [prepared.dir])
    assert f"domains.empty.source.path: empty domain: {empty} is an empty file" in line


def test_prepare_bad_input_creates_no_new_output(
    prepared: Prepared, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def change(cfg: dict[str, Any]) -> None:
        cfg["output"] = str(tmp_path / "new-store")
        cfg["domains"]["docs"]["text"] = "{body}"

    config = prepared.bad_config(tmp_path, change)
    line = run_bad(capsys, ["prepare", "--config", str(config)], [prepared.dir])
    assert "domains.docs: template field {body} is not in the records" in line
    assert not (tmp_path / "new-store").exists()


# -- fit -------------------------------------------------------------------------------------

FIT_CASES = [
    # id, extra arguments, expected text ({tmp}: tmp_path; {store}: the prepared store)
    (
        "store-missing",
        ["--data.init_args.store", "{tmp}/no-store"],
        "{tmp}/no-store: not a token store (no store.json)",
    ),
    (
        "config-file-missing",
        ["--config", "{tmp}/no-such-fit.yaml"],
        "File does not exist: '{tmp}/no-such-fit.yaml'",
    ),
    (
        "ckpt-path-missing",
        ["--ckpt_path", "{tmp}/missing.ckpt"],
        "ckpt_path: checkpoint not found: {tmp}/missing.ckpt",
    ),
    (
        "init-from-missing",
        ["--model.init_from", "{tmp}/missing.ckpt"],
        "model.init_from: checkpoint not found: {tmp}/missing.ckpt",
    ),
    (
        "unknown-val-domain",
        ["--data.init_args.val_sets", "[prose, poetry]"],
        "data.val_sets: unknown domain 'poetry'; known: prose, code, math",
    ),
    (
        "weights-unknown-domain",
        ["--data.init_args.weights", "{prose: 1, poetry: 1}"],
        "data.weights: unknown domain 'poetry'; known: prose, code, math",
    ),
    (
        "weights-only-unknown-domain",
        ["--data.init_args.weights", "{poetry: 1}"],
        "data.weights: unknown domain 'poetry'",
    ),
    (
        "weights-negative",
        ["--data.init_args.weights", "{prose: 1, code: -0.5}"],
        "data.weights.code: weight must be a finite number >= 0, got -0.5",
    ),
    (
        "weights-all-zero",
        ["--data.init_args.weights", "{prose: 0, code: 0, math: 0}"],
        "data.weights: weights are all zero",
    ),
    ("weights-empty", ["--data.init_args.weights", "{}"], "data.weights: weights are all zero"),
    (
        "unknown-model-key",
        ["--model.nonexistent", "3"],
        "unknown key model.nonexistent (command line); see --help for the keys",
    ),
    (
        "unknown-trainer-key",
        ["--trainer.max_stpes", "3"],
        "unknown key trainer.max_stpes (command line); did you mean trainer.max_steps?",
    ),
    (
        "vocab-larger-than-model",
        [
            "--model.model_config",
            "{n_layer: 1, n_embd: 32, n_head: 2, block_size: 64, vocab_size: 256}",
        ],
        "model.vocab_size: the tokenizer has 512 tokens but the model's vocabulary is 256",
    ),
    (
        "seq-len-beyond-context",
        ["--data.init_args.seq_len", "128"],
        "data.seq_len: 128 is beyond the model context 64",
    ),
    (
        "empty-domain-weighted",
        ["--data.init_args.store", "{store}", "--data.init_args.weights", "{docs: 1, tiny: 1}"],
        "data.weights.tiny: empty domain: ",
    ),
    (
        "empty-domain-by-default",
        ["--data.init_args.store", "{store}"],
        "data.weights.tiny: empty domain: ",
    ),
]


@pytest.mark.parametrize(
    ("extra", "expected"), [c[1:] for c in FIT_CASES], ids=[c[0] for c in FIT_CASES]
)
def test_fit_bad_input(
    extra: list[str],
    expected: str,
    run: Run,
    prepared: Prepared,
    builtin_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    places = {"tmp": tmp_path, "store": prepared.store}
    args = ["fit", "--config", str(run.config), *(_fill(a, **places) for a in extra)]
    line = run_bad(capsys, args, [run.dir, builtin_store, prepared.dir])
    assert _fill(expected, **places) in line


def test_fit_empty_domain_names_its_size(
    run: Run, prepared: Prepared, builtin_store: Path, capsys: pytest.CaptureFixture
) -> None:
    tokens = json.loads((prepared.store / "tiny" / "manifest.json").read_text())
    n = tokens["splits"]["train"]["tokens"]
    assert 0 < n < 33
    line = run_bad(
        capsys,
        ["fit", "--config", str(run.config), "--data.init_args.store", str(prepared.store)],
        [run.dir, builtin_store, prepared.dir],
    )
    assert line.endswith(
        f"data.weights.tiny: empty domain: {n} training tokens, fewer than one "
        "sequence of seq_len 32 + 1"
    )


@pytest.mark.parametrize(
    ("extra_yaml", "key"),
    [
        ({"model": {"nonexistent": 3}}, "unknown key model.nonexistent in {extra} line 2"),
        (
            {"trainer": {"max_step": 3}},
            "unknown key trainer.max_step in {extra} line 2; did you mean trainer.max_steps?",
        ),
        ({"bogus": 1}, "unknown key bogus in {extra} line 1"),
        (
            {"data": {"init_args": {"seq_lne": 16}}},
            "unknown key data.seq_lne in {extra} line 3; did you mean data.seq_len?",
        ),
    ],
    ids=["model", "trainer", "top-level", "data"],
)
def test_fit_unknown_yaml_key(
    extra_yaml: dict[str, Any],
    key: str,
    run: Run,
    builtin_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    extra = write_yaml(tmp_path / "extra.yaml", extra_yaml)
    line = run_bad(
        capsys,
        ["fit", "--config", str(run.config), "--config", str(extra)],
        [run.dir, builtin_store],
    )
    assert key.format(extra=extra) in line


def test_validate_missing_checkpoint(
    run: Run, builtin_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "missing.ckpt"
    line = run_bad(
        capsys,
        ["validate", "--config", str(run.config), "--ckpt_path", str(missing)],
        [run.dir, builtin_store],
    )
    assert f"ckpt_path: checkpoint not found: {missing}" in line


# -- the real process ------------------------------------------------------------------------


def test_real_process_exit_code_and_no_traceback(
    run: Run, builtin_store: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-store"
    before = snapshot(run.dir, builtin_store)
    env = {k: v for k, v in os.environ.items() if k != "MIDTRAIN_TRACEBACK"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "midtrain",
            "fit",
            "--config",
            str(run.config),
            "--data.init_args.store",
            str(missing),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr, "fit")
    assert line == (
        f"midtrain fit: error: {missing}: not a token store (no store.json); "
        "run `midtrain prepare --config <yaml>` to build it"
    )
    assert_untouched(before, snapshot(run.dir, builtin_store))
    assert list(tmp_path.iterdir()) == []


def test_traceback_on_request(
    prepared: Prepared,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MIDTRAIN_TRACEBACK", "1")
    config = prepared.bad_config(
        tmp_path, _set("domains", "docs", "source", value={"path": str(tmp_path / "x.jsonl")})
    )
    capsys.readouterr()
    assert main(["prepare", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "midtrain.errors.MidtrainError: domains.docs.source.path: file not found" in err
    assert err.strip().splitlines()[-1] == (
        f"midtrain prepare: error: domains.docs.source.path: file not found: {tmp_path}/x.jsonl"
    )
