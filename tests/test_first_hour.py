"""A researcher's first hour: validate/test name the weights they evaluate, no false or noisy
Lightning lines, forgiving quick tries (val_check_interval beyond the run, YAML and dict slips
as one line, duplicated YAML keys refused), progress in steps after a resume."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from midtrain.cli import main
from tests.test_training import fit_config, scalars

REPO = Path(__file__).resolve().parents[1]
NOISE = [
    "not resumable",
    "litlogger",
    "LeafSpec",
    "exists and is not empty",
    "GPU available",
    "TPU available",
]


def error_lines(err: str) -> list[str]:
    """The command's own error lines (Lightning may log e.g. "Seed set to 0" before)."""
    return [line for line in err.strip().splitlines() if line.startswith("midtrain ")]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "midtrain", *args],
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=600,
    )


def test_validate_and_test_require_weights_and_name_them(
    tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "v", max_steps=2, limit_val_batches=0)
    for command in ("validate", "test"):
        assert main([command, "--config", str(cfg)]) == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and "--ckpt_path" in err[0] and "model.init_from" in err[0]
        assert not (tmp_path / "v").exists()  # nothing written
    assert main(["fit", "--config", str(cfg)]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "v" / "checkpoints" / "last.ckpt"
    assert main(["validate", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"midtrain validate: evaluating checkpoint {ckpt} (trained 2 steps)"
    # one table: a row per metric, a column per validation set
    assert out[1].split() == ["prose", "code", "math"]
    rows = {line.split()[0]: line.split()[1:] for line in out[2:]}
    assert set(rows) == {"val/loss", "val/ppl", "val/bpb"}
    assert all(len(v) == 3 for v in rows.values())
    assert main(["test", "--config", str(cfg), "--model.init_from", str(ckpt)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"midtrain test: evaluating model.init_from (weights only) {ckpt} (trained 2 steps)"
    )
    assert out[1].split() == ["prose", "code", "math"] and out[2].startswith("test/loss")


def test_limit_val_batches_is_refused_for_named_sets(
    tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "l", max_steps=2, limit_val_batches=2)
    assert main(["fit", "--config", str(cfg)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "trainer.limit_val_batches: 2" in err[0]
    assert "data.val_max_blocks" in err[0]
    assert not (tmp_path / "l").exists()


def test_quiet_resume_progress_in_steps_and_late_validation(
    tmp_path: Path, builtin_store: Path
) -> None:
    """A quick try with val_check_interval beyond the run validates at the end; a resumed run
    prints no false warning and its progress bar shows steps of the whole run."""
    cfg = fit_config(
        tmp_path, builtin_store, "q", max_steps=6, val_check_interval=100, enable_progress_bar=True
    )
    first = run(
        "fit",
        "--config",
        str(cfg),
        "--checkpoint.every_n_train_steps",
        "3",
        "--checkpoint.save_top_k",
        "-1",
    )
    assert first.returncode == 0, first.stderr[-2000:]
    output = first.stdout + first.stderr
    assert (
        "trainer.val_check_interval: 100 steps is beyond the run's 6; validating at the end "
        "of the run"
    ) in output
    assert [s for s, _ in scalars(tmp_path / "q")["val/prose/loss"]] == [5]
    step3 = tmp_path / "q" / "checkpoints" / "epoch=0-step=3.ckpt"
    resumed = run(
        "fit", "--config", str(cfg), "--ckpt_path", str(step3), "--trainer.limit_val_batches", "0"
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    output = resumed.stdout + resumed.stderr
    for noise in NOISE:
        assert noise not in output, noise
    bars = [line for line in re.split(r"[\r\n]", resumed.stdout) if "it/s" in line]
    assert bars and all("/6 " in line or "/6[" in line for line in bars), bars
    assert re.search(r"\b3/6\b", bars[0]) and re.search(r"\b6/6\b", bars[-1])


def test_yaml_errors_name_file_and_line(
    tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "y", max_steps=2)
    text = cfg.read_text()
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace("model:\n", "model:\n  lr: [1, 2\n", 1))
    duplicated = tmp_path / "dup.yaml"
    duplicated.write_text(text.replace("model:\n", "model:\n  lr: 0.1\n  lr: 0.2\n", 1))
    line = text.splitlines().index("model:") + 2
    assert main(["fit", "--config", str(broken)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and f"{broken}:{line + 1}:" in err[0] and "YAML syntax error" in err[0]
    assert main(["fit", "--config", str(duplicated)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert err == [
        f"midtrain fit: error: {duplicated}:{line + 1}: key 'lr' is given twice "
        f"(first at line {line}); a YAML mapping takes each key once: remove one"
    ]
    assert not (tmp_path / "y").exists()


def test_duplicated_keys_refused_in_nested_files_values_and_tool_configs(
    tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "d", max_steps=2)
    weights = "{prose: 1, code: 1, prose: 2}"  # a domain given twice
    assert main(["fit", "--config", str(cfg), "--data.weights", weights]) == 2
    assert "key 'prose' is given twice" in capsys.readouterr().err
    prepare = tmp_path / "prepare.yaml"
    prepare.write_text(
        yaml.safe_dump({"output": str(tmp_path / "store")})
        + "domains:\n  a: {source: {builtin: arithmetic}}\n"
        "  a: {source: {builtin: python-docs}}\n"
    )
    assert main(["prepare", "--config", str(prepare)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert err == [
        f"midtrain prepare: error: {prepare}:4: key 'a' is given twice (first at "
        "line 3); a YAML mapping takes each key once: remove one"
    ]
    assert not (tmp_path / "store").exists()
    # a nested file given for a key, read by jsonargparse itself
    trainer = tmp_path / "trainer.txt"
    trainer.write_text("max_steps: 2\nmax_steps: 3\n")
    assert main(["fit", "--config", str(cfg), "--trainer", str(trainer)]) == 2
    assert "key 'max_steps' is given twice" in capsys.readouterr().err


QUESTION = "Question: {q}"  # a mapping, if YAML read it a second time


def test_quoted_strings_stay_strings_in_any_typed_keys(
    tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture
) -> None:
    """A callback's ``Any``-typed init arg, from a config file and from the command line (a
    YAML value), reaches the callback as the string given, and the run's saved config.yaml
    gives it back as that string."""
    cfg = fit_config(tmp_path, builtin_store, "s", max_steps=1, limit_val_batches=0)
    record = tmp_path / "value.json"
    callback = {"class_path": "tests.helpers.RecordValue", "init_args": {"path": str(record)}}
    raw = yaml.safe_load(cfg.read_text())
    raw["trainer"]["callbacks"] = [{**callback, "init_args": {**callback["init_args"]}}]
    raw["trainer"]["callbacks"][0]["init_args"]["value"] = QUESTION
    in_file = tmp_path / "in-file.yaml"
    in_file.write_text(yaml.safe_dump(raw))
    assert f"value: '{QUESTION}'" in in_file.read_text()  # quoted in the file
    assert main(["fit", "--config", str(in_file)]) == 0
    assert json.loads(record.read_text()) == QUESTION
    saved = tmp_path / "s" / "config.yaml"
    assert yaml.safe_load(saved.read_text())["trainer"]["callbacks"][0]["init_args"]["value"] == (
        QUESTION
    )
    # the run's own config.yaml, read back by the command: the same string again
    record.unlink()
    assert main(["fit", "--config", str(saved), "--ckpt_path", "last"]) == 0
    assert json.loads(record.read_text()) == QUESTION

    # on the command line, inside a YAML value: a mapping and a list holding the string
    def on_command_line(run: str, value: str) -> object:
        record.unlink(missing_ok=True)
        args = ["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / run)]
        args += ["--trainer.callbacks+=tests.helpers.RecordValue"]
        args += [f"--trainer.callbacks.path={record}", "--trainer.callbacks.value", value]
        assert main(args) == 0
        return json.loads(record.read_text())

    given = f'{{template: "{QUESTION}", n: 2, parts: ["{QUESTION}", x]}}'
    expected = {"template": QUESTION, "n": 2, "parts": [QUESTION, "x"]}
    assert on_command_line("c", given) == expected
    # a command-line value of its own is YAML, as every command-line value is
    assert on_command_line("m", QUESTION) == {"Question": {"q": None}}


@pytest.mark.parametrize("value", ["{prose:1}", "{prose:1,code:2}", "prose:1"])
def test_command_line_dict_slips_are_one_line(
    tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture, value: str
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "c", max_steps=2)
    assert main(["fit", "--config", str(cfg), "--data.weights", value]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and len(err[0]) < 220, err
    assert err[0].startswith("midtrain fit: error: --data.weights: ") and "'{" in err[0]
