"""`midtrain experiment`: stages, resumability, and a table that equals the runs' own logs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from midtrain.cli import main
from midtrain.data.prepare import DomainConfig, PrepareConfig, TokenizerConfig, prepare
from midtrain.errors import MidtrainError
from midtrain.experiment import _betainc, last_scalar, welch_t_test

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_t_distribution_matches_closed_forms() -> None:
    for t in (0.1, 0.7, 1.5, 4.0, 12.0):
        # two-sided p of Student's t: df=1 (Cauchy) and df=2 have closed forms
        p1 = _betainc(0.5, 0.5, 1 / (1 + t * t))
        assert p1 == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-9)
        p2 = _betainc(1.0, 0.5, 2 / (2 + t * t))
        assert p2 == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)


def test_welch_t_test() -> None:
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 3.5, 4.0, 5.0, 9.0]
    vx, vy = np.var(x, ddof=1) / 4, np.var(y, ddof=1) / 5
    t = (np.mean(x) - np.mean(y)) / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / 3 + vy**2 / 4)
    assert welch_t_test(x, y) == pytest.approx(_betainc(df / 2, 0.5, df / (df + t * t)))
    assert 0.05 < welch_t_test(x, y) < 0.5
    assert welch_t_test([1.0, 1.1], [5.0, 5.1]) < 0.01
    assert math.isnan(welch_t_test([1.0], [2.0, 3.0]))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, builtin_store: Path) -> Path:
    root = tmp_path_factory.mktemp("study")
    src = root / "qa.jsonl"
    src.write_text("".join(json.dumps({"q": f"{i} plus {i}?", "a": f"{2 * i}."}) + "\n"
                           for i in range(80)))
    sft_store = prepare(PrepareConfig(
        output=str(root / "sft-store"),
        domains={"qa": DomainConfig(source={"path": str(src)}, prompt="Q: {q}\nA: ",
                                    response="{a}", val_fraction=0.2)},
        tokenizer=TokenizerConfig(path=str(builtin_store / "tokenizer.json"))))
    model = {"arch": "tiny", "model_config": {"n_layer": 1, "n_embd": 32, "n_head": 2,
                                              "block_size": 64}}
    quiet = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
             "enable_model_summary": False, "num_sanity_val_steps": 0, "log_every_n_steps": 1}
    (root / "pre.yaml").write_text(yaml.safe_dump({
        "seed_everything": 0, "model": {**model, "lr": 3e-3},
        "data": {"class_path": "midtrain.MixtureDataModule",
                 "init_args": {"store": str(builtin_store), "weights": {"prose": 1.0},
                               "seq_len": 32, "micro_batch_size": 4}},
        "trainer": {**quiet, "max_steps": 8, "limit_val_batches": 0}}))
    (root / "sft.yaml").write_text(yaml.safe_dump({
        "model": {**model, "warmup": 0},
        "data": {"class_path": "midtrain.SFTDataModule",
                 "init_args": {"store": str(sft_store), "target": "qa",
                               "general_store": str(builtin_store), "max_length": 32,
                               "micro_batch_size": 4, "val_max_examples": 8,
                               "general_val_max_blocks": 8}},
        "trainer": {**quiet, "max_steps": 3, "val_check_interval": 3}}))
    (root / "study.yaml").write_text(yaml.safe_dump({
        "output": str(root / "out"), "general": "prose",
        "pretrain": {"config": [str(root / "pre.yaml")]},
        "branches": {"mid": {"grid": {"domain": "code", "start": [4], "weight": [0.5]}}},
        "sft": {"config": [str(root / "sft.yaml")], "targets": {"qa": {"target": "qa"}},
                "lrs": [1e-3], "seeds": [0, 1]},
        "similarity_docs": 20, "similarity_top_k": 200}))
    assert main(["experiment", "--config", str(root / "study.yaml")]) == 0
    return root


def test_micro_study_table_equals_the_runs_logs(study: Path) -> None:
    out = study / "out"
    rows = list(__import__("csv").DictReader((out / "results.csv").open()))
    assert {(r["branch"], r["seed"]) for r in rows} == {
        ("baseline", "0"), ("baseline", "1"), ("mid-s4-w0.5", "0"), ("mid-s4-w0.5", "1")}
    for r in rows:
        run = Path(r["run"])
        assert float(r["in_domain_loss"]) == pytest.approx(last_scalar(run, "val/qa/loss"))
        assert float(r["general_loss"]) == pytest.approx(last_scalar(run, "val/prose/loss"))
    summary = {s["branch"]: s for s in __import__("csv").DictReader((out / "summary.csv").open())}
    for branch in ("baseline", "mid-s4-w0.5"):
        ind = [float(r["in_domain_loss"]) for r in rows if r["branch"] == branch]
        assert float(summary[branch]["in_domain_mean"]) == pytest.approx(np.mean(ind))
        assert float(summary[branch]["in_domain_std"]) == pytest.approx(np.std(ind, ddof=1))
    base = float(summary["baseline"]["in_domain_mean"])
    mid = float(summary["mid-s4-w0.5"]["in_domain_mean"])
    assert float(summary["mid-s4-w0.5"]["in_domain_rel_improvement"]) == pytest.approx(
        (base - mid) / base)
    assert "proximity_advantage" in summary["mid-s4-w0.5"]
    table = (out / "results.md").read_text()
    assert "| qa | baseline |" in table and "| qa | mid-s4-w0.5 |" in table
    assert len(list((out / "hparams").rglob("events.out.tfevents*"))) >= 4
    # the branch forked from the shared prefix at its start step
    fork = out / "pretrain" / "baseline" / "checkpoints" / "step=4.ckpt"
    assert fork.is_file()
    assert "--fork" in (out / "pretrain" / "mid-s4-w0.5" / "stage.log").read_text()


def test_rerun_skips_finished_and_resumes_interrupted(study: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = study / "out"
    redo = out / "sft" / "baseline" / "qa" / "lr0.001-seed1"
    (redo / "done.json").unlink()  # as if killed after its last checkpoint
    capsys.readouterr()
    assert main(["experiment", "--config", str(study / "study.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("done already" in x for x in lines) == 5
    assert any("sft baseline qa lr=0.001 seed=1: resumed" in x for x in lines)
    assert (redo / "done.json").is_file()


def test_bad_experiment_configs(tmp_path: Path, study: Path) -> None:
    cfg = yaml.safe_load((study / "study.yaml").read_text())
    cases = [
        ({"branches": {"x": {"grid": {"domain": "code", "start": [4]}}}}, "branches.x.grid"),
        ({"branches": {"x": {"grid": {"domain": "code", "start": [4], "weight": [1.5]}}}},
         "is not in (0, 1]"),
        ({"branches": {"baseline": {"switch": {"step": 2, "weights": {"code": 1}}}}},
         "the baseline is the pretraining run"),
        ({"sft": {**cfg["sft"], "targets": {}}}, "name at least one SFT target"),
        ({"pretrain": {"config": [str(tmp_path / "missing.yaml")]}}, "config file not found"),
        ({"bogus": 1}, "bogus"),
    ]
    for change, message in cases:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**cfg, "output": str(tmp_path / "o"), **change}))
        with pytest.raises(MidtrainError, match=re.escape(message)):
            from midtrain.cli import experiment_main

            experiment_main(["--config", str(bad)])
        assert not (tmp_path / "o").exists()


def test_paper_study_parses_and_plans_without_running(capsys: pytest.CaptureFixture) -> None:
    assert main(["experiment", "--config", str(CONFIGS / "study" / "paper.yaml"),
                 "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "pretrain baseline" in out and "tokens per domain per phase" in out
    assert "starcoder" in out and "steps 6000-61035" in out


def test_grid_scales_the_pretraining_mixture(tmp_path: Path) -> None:
    from midtrain.experiment import ExperimentConfig, PretrainConfig, SFTConfig, expand_branches

    pre = tmp_path / "pre.yaml"
    pre.write_text(yaml.safe_dump({"data": {"init_args": {"weights": {"c4": 1, "books": 3}}}}))
    cfg = ExperimentConfig(
        output=str(tmp_path / "o"), general="c4", pretrain=PretrainConfig(config=[str(pre)]),
        sft=SFTConfig(config=[], targets={"t": {"target": "t"}}, lrs=[1e-3]),
        branches={"mid": {"grid": {"domain": "code", "start": [10], "weight": [0.2, 1.0]}},
                  "cpt": {"switch": {"step": 20, "weights": {"code": 1}}}})
    b = expand_branches(cfg)
    assert b["mid-s10-w0.2"]["weights"] == {"c4": 0.2, "books": 0.6, "code": 0.2}
    assert b["mid-s10-w1"]["weights"] == {"code": 1.0}
    assert b["cpt"] == {"step": 20, "weights": {"code": 1.0}, "domain": "code"}
    assert b["baseline"]["step"] is None
