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
from midtrain.study.report import last_scalar
from midtrain.study.stats import _betainc, welch_t_test
from tests.helpers import MODEL, QUIET

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_pretrain(path: Path, store: Path, weights: dict[str, float]) -> Path:
    """A tiny pretraining fit config on the built-in store."""
    path.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 0,
                "model": {**MODEL, "lr": 3e-3},
                "data": {
                    "class_path": "midtrain.MixtureDataModule",
                    "init_args": {
                        "store": str(store),
                        "weights": weights,
                        "seq_len": 32,
                        "micro_batch_size": 4,
                    },
                },
                "trainer": {**QUIET, "max_steps": 8, "limit_val_batches": 0},
            }
        )
    )
    return path


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
    src.write_text(
        "".join(json.dumps({"q": f"{i} plus {i}?", "a": f"{2 * i}."}) + "\n" for i in range(80))
    )
    sft_store = prepare(
        PrepareConfig(
            output=str(root / "sft-store"),
            domains={
                "qa": DomainConfig(
                    source={"path": str(src)},
                    prompt="Q: {q}\nA: ",
                    response="{a}",
                    val_fraction=0.2,
                )
            },
            tokenizer=TokenizerConfig(path=str(builtin_store / "tokenizer.json")),
        )
    )
    write_pretrain(root / "pre.yaml", builtin_store, {"prose": 1.0})
    (root / "sft.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {**MODEL, "warmup": 0},
                "data": {
                    "class_path": "midtrain.SFTDataModule",
                    "init_args": {
                        "store": str(sft_store),
                        "target": "qa",
                        "general_store": str(builtin_store),
                        "max_length": 32,
                        "micro_batch_size": 4,
                        "val_max_examples": 8,
                        "general_val_max_blocks": 8,
                    },
                },
                "trainer": {**QUIET, "max_steps": 3, "val_check_interval": 3},
            }
        )
    )
    (root / "study.yaml").write_text(
        yaml.safe_dump(
            {
                "output": str(root / "out"),
                "general": "prose",
                "pretrain": {"config": [str(root / "pre.yaml")]},
                "branches": {"mid": {"grid": {"domain": "code", "start": [4], "weight": [0.5]}}},
                "sft": {
                    "config": [str(root / "sft.yaml")],
                    "targets": {"qa": {"target": "qa"}},
                    "lrs": [1e-3],
                    "seeds": [0, 1],
                },
                "similarity_docs": 20,
                "similarity_top_k": 200,
            }
        )
    )
    assert main(["experiment", "--config", str(root / "study.yaml")]) == 0
    return root


def test_micro_study_table_equals_the_runs_logs(study: Path) -> None:
    out = study / "out"
    rows = list(__import__("csv").DictReader((out / "results.csv").open()))
    assert {(r["branch"], r["seed"]) for r in rows} == {
        ("baseline", "0"),
        ("baseline", "1"),
        ("mid-s4-w0.5", "0"),
        ("mid-s4-w0.5", "1"),
    }
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
        (base - mid) / base
    )
    assert "proximity_advantage" in summary["mid-s4-w0.5"]
    table = (out / "results.md").read_text()
    assert "| qa | baseline |" in table and "| qa | mid-s4-w0.5 |" in table
    assert len(list((out / "hparams").rglob("events.out.tfevents*"))) >= 4
    # the branch forked from the shared prefix at its start step
    fork = out / "pretrain" / "baseline" / "checkpoints" / "step=4.ckpt"
    assert fork.is_file()
    assert "--fork" in (out / "pretrain" / "mid-s4-w0.5" / "stage.log").read_text()


def test_rerun_skips_finished_and_resumes_interrupted(
    study: Path, capsys: pytest.CaptureFixture
) -> None:
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
        (
            {"branches": {"x": {"grid": {"domain": "code", "start": [4], "weight": [1.5]}}}},
            "is not in (0, 1]",
        ),
        (
            {"branches": {"baseline": {"switch": {"step": 2, "weights": {"code": 1}}}}},
            "the baseline is the pretraining run",
        ),
        ({"sft": {**cfg["sft"], "targets": {}}}, "name at least one SFT target"),
        ({"pretrain": {"config": [str(tmp_path / "missing.yaml")]}}, "config file not found"),
        ({"bogus": 1}, "bogus"),
    ]
    for change, message in cases:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**cfg, "output": str(tmp_path / "o"), **change}))
        with pytest.raises(MidtrainError, match=re.escape(message)):
            from midtrain.cli.tools import experiment_main

            experiment_main(["--config", str(bad)])
        assert not (tmp_path / "o").exists()


def test_paper_study_parses_and_plans_without_running(capsys: pytest.CaptureFixture) -> None:
    assert main(["experiment", "--config", str(CONFIGS / "study" / "paper.yaml"), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "pretrain baseline" in out and "tokens per domain per phase" in out
    assert "starcoder" in out and "6000-61035" in out


def test_grid_scales_the_pretraining_mixture(tmp_path: Path) -> None:
    from midtrain.study import ExperimentConfig, PretrainConfig, SFTConfig, expand_branches

    cfg = ExperimentConfig(
        output=str(tmp_path / "o"),
        general="c4",
        pretrain=PretrainConfig(config=[]),
        sft=SFTConfig(config=[], targets={"t": {"target": "t"}}, lrs=[1e-3]),
        branches={
            "mid": {"grid": {"domain": "code", "start": [10], "weight": [0.2, 1.0]}},
            "cpt": {"switch": {"step": 20, "weights": {"code": 1}}},
        },
    )
    b = expand_branches(cfg, {"c4": 1, "books": 3})
    assert b["mid-s10-w0.2"]["weights"] == {"c4": 0.2, "books": 0.6, "code": 0.2}
    assert b["mid-s10-w1"]["weights"] == {"code": 1.0}
    assert b["cpt"] == {"step": 20, "weights": {"code": 1.0}, "domain": "code"}
    assert b["baseline"]["step"] is None


def test_dry_run_shows_realized_shares(capsys: pytest.CaptureFixture) -> None:
    # the CPU study's 20%-code branch at global batch 16: 3 of 16 sequences are code
    assert main(["experiment", "--config", str(CONFIGS / "study" / "cpu.yaml"), "--dry_run"]) == 0
    out = capsys.readouterr().out
    code = next(x for x in out.splitlines() if x.split()[:2] == ["15-150", "code"])
    prose = next(x for x in out.splitlines() if x.split()[:2] == ["15-150", "prose"])
    assert code.split()[2:5] == ["0.200", "3/16", "18.75%"]
    assert prose.split()[2:5] == ["0.800", "13/16", "81.25%"]
    assert "global batch 16" in out


def test_proximity_is_against_the_real_pretraining_mixture(
    tmp_path: Path, builtin_store: Path
) -> None:
    from midtrain.data.store import Store
    from midtrain.study import ExperimentConfig, PretrainConfig, SFTConfig, plan_study
    from midtrain.study.plan import realized_mixture
    from midtrain.study.report import proximity
    from midtrain.study.similarity import blend, similarity, token_counts

    pre = write_pretrain(tmp_path / "pre.yaml", builtin_store, {"prose": 0.5, "math": 0.5})
    cfg = ExperimentConfig(
        output=str(tmp_path / "o"),
        general="prose",
        pretrain=PretrainConfig(config=[str(pre)]),
        sft=SFTConfig(config=[str(pre)], targets={"t": {"target": "code"}}, lrs=[1e-3]),
        branches={"mid": {"grid": {"domain": "code", "start": [4], "weight": [0.5]}}},
        similarity_docs=20,
        similarity_top_k=200,
    )
    study = plan_study(cfg)
    rows = study.mixture_rows()
    base, mix = {"prose": 0.5, "math": 0.5}, {"prose": 0.25, "math": 0.25, "code": 0.5}
    assert realized_mixture(rows["baseline"], 0) == base  # 2 + 2 of a batch of 4
    assert realized_mixture(rows["mid-s4-w0.5"], 1) == mix  # 1 + 1 + 2
    store = Store(builtin_store)
    counts = {d: token_counts(store, d, 20) for d in ("prose", "math", "code")}
    target = token_counts(store, "code", 20, seed=1)  # another sample of the domain
    advantage = proximity(study, {"t": target})

    def dist(x: np.ndarray) -> float:
        return 1 - similarity(x, target, 200)

    direct = dist(blend(counts, base)) - dist(blend(counts, mix))
    general_only = dist(counts["prose"]) - dist(blend(counts, mix))
    assert advantage[("mid-s4-w0.5", "t")] == pytest.approx(direct, rel=1e-12)
    assert abs(direct - general_only) > 0.01  # the general domain alone would mislead
    assert advantage[("baseline", "t")] == 0.0
    assert not (tmp_path / "o").exists()


def test_report_has_a_column_per_eval_tag(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from midtrain.study import Stage
    from midtrain.study.report import collect, summarize, write_report

    stages = []
    for branch, seed, acc in [
        ("baseline", 0, 0.25),
        ("baseline", 1, 0.35),
        ("mid", 0, 0.5),
        ("mid", 1, 0.6),
    ]:
        run = tmp_path / branch / str(seed)
        w = SummaryWriter(str(run))
        for step in (1, 2):
            w.add_scalar("val/qa/loss", 2.0 + seed + 1 / step, step)
            w.add_scalar("val/prose/loss", 3.0 + seed, step)
            w.add_scalar("eval/arc_easy/acc", acc * step / 2, step)  # the last value is acc
        w.close()
        stages.append(
            Stage(
                f"sft {branch} {seed}",
                "sft",
                [],
                run,
                meta={"branch": branch, "target": "qa", "lr": 1e-3, "seed": seed, "domain": "qa"},
            )
        )
    rows = collect(stages, "prose")
    assert [r["eval/arc_easy/acc"] for r in rows] == pytest.approx([0.25, 0.35, 0.5, 0.6])
    assert [r["in_domain_loss"] for r in rows] == pytest.approx([2.5, 3.5, 2.5, 3.5])
    table = write_report(tmp_path, "prose", rows, summarize(rows))
    results = list(__import__("csv").DictReader((tmp_path / "results.csv").open()))
    assert float(results[2]["eval/arc_easy/acc"]) == pytest.approx(0.5)
    summary = {
        s["branch"]: s for s in __import__("csv").DictReader((tmp_path / "summary.csv").open())
    }
    assert float(summary["mid"]["eval/arc_easy/acc_mean"]) == pytest.approx(0.55)
    assert float(summary["mid"]["eval/arc_easy/acc_std"]) == pytest.approx(
        np.std([0.5, 0.6], ddof=1)
    )
    assert table.splitlines()[4].endswith("| eval/arc_easy/acc |")
    assert "| 0.5500 ± 0.0707 |" in table


def test_changed_config_is_refused_naming_the_keys(study: Path) -> None:
    from midtrain.cli.tools import experiment_main
    from midtrain.study import plan_study
    from midtrain.study.config import ExperimentConfig, PretrainConfig, SFTConfig
    from midtrain.study.run import check_stages

    out = study / "out"
    done = {p: p.read_text() for p in out.rglob("done.json")}
    for name, key, stage in [
        ("sft.yaml", "trainer.max_steps", "sft baseline qa lr=0.001 seed=0"),
        ("pre.yaml", "model.lr", "pretrain baseline"),
    ]:
        path = study / name
        original = path.read_text()
        changed = yaml.safe_load(original)
        changed[key.split(".")[0]][key.split(".")[1]] = 4 if key == "trainer.max_steps" else 1e-3
        path.write_text(yaml.safe_dump(changed))
        try:
            with pytest.raises(
                MidtrainError,
                match=re.escape(f"stage '{stage}' in {out}")
                + r".*"
                + re.escape(f"(changed: {path}: {key});"),
            ):
                experiment_main(["--config", str(study / "study.yaml")])
            if name == "pre.yaml":  # every stage starts from the baseline: all are stale
                raw = yaml.safe_load((study / "study.yaml").read_text())
                cfg = ExperimentConfig(
                    **{
                        **raw,
                        "pretrain": PretrainConfig(**raw["pretrain"]),
                        "sft": SFTConfig(**raw["sft"]),
                    }
                )
                _, stale = check_stages(plan_study(cfg).stages, rerun_changed=True)
                assert len(stale) == 6
        finally:
            path.write_text(original)
    assert {p: p.read_text() for p in out.rglob("done.json")} == done  # nothing touched


@pytest.mark.slow
def test_rerun_changed_reruns_changed_stages(study: Path, capsys: pytest.CaptureFixture) -> None:
    sft = study / "sft.yaml"
    changed = yaml.safe_load(sft.read_text())
    changed["trainer"].update(max_steps=4, val_check_interval=4)
    sft.write_text(yaml.safe_dump(changed))
    capsys.readouterr()
    assert main(["experiment", "--config", str(study / "study.yaml"), "--rerun_changed"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("re-ran (config changed)" in x for x in lines) == 4  # the SFT runs
    assert sum("done already" in x for x in lines) == 2  # the baseline and the branch
    assert main(["experiment", "--config", str(study / "study.yaml")]) == 0  # now consistent


def test_quoted_strings_stay_strings_in_sft_targets(tmp_path: Path) -> None:
    """``sft.targets`` (``dict[str, dict[str, Any]]``) keeps a quoted string a string, from the
    study file and from the command line, up to the SFT stages' fit arguments."""
    from midtrain.cli.tools import experiment_config
    from midtrain.study.plan import _sft_stages

    question = "Question: {q}"  # a mapping, if YAML read it a second time
    study = yaml.safe_load((CONFIGS / "study" / "cpu.yaml").read_text())
    study["sft"]["targets"]["math"]["prompt_template"] = question
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert f"prompt_template: '{question}'" in path.read_text()
    cfg, _ = experiment_config(["--config", str(path)])
    assert cfg.sft.targets["math"] == {"target": "math_sft", "prompt_template": question}
    math = [s for s in _sft_stages(cfg, tmp_path / "out", {"baseline": {}}) if "math" in s.name]
    assert math and all(f"--data.init_args.prompt_template={question}" in s.args for s in math)

    given = f'{{math: {{target: math_sft, prompt_template: "{question}"}}}}'
    cfg, _ = experiment_config(["--config", str(path), "--sft.targets", given])
    assert cfg.sft.targets == {"math": {"target": "math_sft", "prompt_template": question}}
