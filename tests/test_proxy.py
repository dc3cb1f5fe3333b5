"""Proxies (microanneals) from a pretraining run's checkpoints: the proxy sweep picks the planted
best mixture on a CPU toy, refuses bad input in one line with nothing written, and
``advise --check --proxy_steps`` orders a study's branches as they were measured (slow)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import yaml

from midtrain.cli import main
from midtrain.errors import MidtrainError
from midtrain.study.sweep import load_sweep, run_sweep
from tests.helpers import MODEL, QUIET
from tests.test_experiment import write_pretrain

pytest.importorskip("sklearn", reason="the proxy sweep fits the regression of midtrain[advise]")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, builtin_store: Path) -> Path:
    """A 16-step pretraining run on prose with a fork point at step 4, and an SFT config that
    scores the built-in ``math`` domain (prompt + response) with ``prose`` as the general set."""
    root = tmp_path_factory.mktemp("proxy")
    pre = write_pretrain(root / "pre.yaml", builtin_store, {"prose": 1.0})
    cfg = yaml.safe_load(pre.read_text())
    cfg["trainer"]["max_steps"] = 16
    pre.write_text(yaml.safe_dump(cfg))
    args = ["--trainer.callbacks+=midtrain.callbacks.CheckpointAtSteps",
            "--trainer.callbacks.steps=[4]", f"--trainer.default_root_dir={root / 'run'}"]  # fmt: skip
    assert main(["fit", "--config", str(pre), *args]) == 0
    (root / "sft.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {**MODEL, "warmup": 0},
                "data": {
                    "class_path": "midtrain.SFTDataModule",
                    "init_args": {
                        "store": str(builtin_store),
                        "target": "math",
                        "general_store": str(builtin_store),
                        "max_length": 32,
                        "micro_batch_size": 4,
                        "val_max_examples": 16,
                        "general_val_max_blocks": 8,
                    },
                },
                "trainer": {**QUIET, "max_steps": 2},
            }
        )
    )
    return root


def sweep_yaml(root: Path, **change: object) -> Path:
    cfg = {
        "output": str(root / "sweep"),
        "run": str(root / "run"),
        "starts": [4],
        "steps": 3,
        "candidates": {"grid": {"domain": ["code", "math"], "weight": [0.5, 1.0]}},
        "general": "prose",
        "sft": {"config": [str(root / "sft.yaml")], "targets": {"math": {"target": "math"}}},
        **change,
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sweep_picks_the_planted_best_mixture(
    pretrained: Path, capsys: pytest.CaptureFixture
) -> None:
    """The target is the ``math`` domain itself: the more of it a proxy trains on, the lower
    its loss, so the best candidate is all math. With a soup of the two best proxies."""
    result = run_sweep(load_sweep(str(sweep_yaml(pretrained, soup=2))))
    (best,) = result.best
    assert best.best_measured == "proxy-math-s4-w1"
    assert best.features["weight/math"] == pytest.approx(1.0)
    assert best.low <= best.predicted <= best.high
    gains = {p.name: result.measured[(p.name, "math")].predictors for p in result.proxies}
    assert gains["control-s4"] == {"proxy": 0.0, "proxy_seen": 0.0, "proxy_retention": 0.0}
    assert gains["proxy-math-s4-w1"]["proxy"] > gains["proxy-math-s4-w0.5"]["proxy"] > 0
    assert gains["proxy-code-s4-w1"]["proxy"] < gains["proxy-math-s4-w0.5"]["proxy"]
    # (16 - 4) / 3: the measured gain extrapolated to a full branch's steps
    m = gains["proxy-math-s4-w1"]
    assert m["proxy_seen"] == pytest.approx(m["proxy"] * 4)
    # 5 runs of 3 steps against 4 full branches of 12 steps
    assert (result.proxy_steps, result.full_steps) == (15, 48)
    out = pretrained / "sweep"
    printed = capsys.readouterr().out
    assert "compute: 15 proxy steps vs 48 for the same candidates as full branches" in printed
    assert "| math | math 1.00 | 4 | 0 |" in printed
    members, loss, best_member = result.soups["math"]
    assert members == ["proxy-math-s4-w1", "proxy-math-s4-w0.5"]
    assert (out / "soups" / "math.ckpt").is_file() and loss > 0
    assert best_member == result.measured[("proxy-math-s4-w1", "math")].in_domain
    assert (
        f"soup for math of proxy-math-s4-w1, proxy-math-s4-w0.5: in-domain loss {loss:.4f}"
        in printed
    )
    with (out / "proxies.csv").open() as f:
        rows = {r["proxy"]: r for r in csv.DictReader(f)}
    assert set(rows) == {
        "control-s4",
        *(f"proxy-{d}-s4-w{w}" for d in ("code", "math") for w in ("0.5", "1")),
    }
    for name in rows:  # every proxy a named, finished branch forked from the run
        log = (out / "proxies" / name / "stage.log").read_text()
        assert (
            "--fork" in log
            and "step=4.ckpt" in log
            and (out / "proxies" / name / "done.json").is_file()
        )
    # a re-run runs no proxy or score again
    run_sweep(load_sweep(str(sweep_yaml(pretrained, soup=2))))
    assert capsys.readouterr().out.count("done already") == 10


@pytest.mark.slow
def test_sweep_scores_after_a_short_sft(pretrained: Path, tmp_path: Path) -> None:
    """``sft.steps``: every proxy is fine-tuned for that many steps before it is scored; the
    scores are the SFT runs' own last validation."""
    from midtrain.study.report import last_scalar

    path = sweep_yaml(pretrained, output=str(tmp_path / "sft-sweep"))
    cfg = yaml.safe_load(path.read_text())
    cfg["sft"]["steps"] = 2
    path.write_text(yaml.safe_dump(cfg))
    result = run_sweep(load_sweep(str(path)))
    assert result.best[0].best_measured == "proxy-math-s4-w1"
    run = tmp_path / "sft-sweep" / "scores" / "proxy-math-s4-w1" / "math"
    assert "--trainer.max_steps=2" in (run / "stage.log").read_text()
    measured = result.measured[("proxy-math-s4-w1", "math")]
    assert measured.in_domain == pytest.approx(last_scalar(run, "val/math/loss"))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"steps": 13}, "steps: 13 proxy steps from proxy-code-s4-w0.5's start step 4 run past the run's "
                        "trainer.max_steps=16; give at most 12"),
        ({"starts": [5]}, "starts: the run "),
        ({"candidates": {"grid": {"domain": "poetry", "weight": [0.5]}}}, "candidates: domain 'poetry' is not in the run's store"),
        ({"candidates": {"grid": {"domain": "code", "weight": [0.5]}}}, "candidates: 2 proxies (controls included) for 2 varying features"),
        ({"lr_schedule": "cosine"}, "lr_schedule: 'cosine' is not one of anneal, anneal_wsd"),
        ({"bogus": 1}, "unknown key 'bogus'"),
    ],
)  # fmt: skip
def test_bad_sweeps_are_one_line_and_write_nothing(
    pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture, change: dict, message: str
) -> None:
    path = sweep_yaml(pretrained, output=str(tmp_path / "none"), **change)
    assert main(["advise", "--proxy", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("midtrain advise: error: ") and "\n" not in err and message in err
    assert not (tmp_path / "none").exists()


def test_a_checkpoint_from_another_run_is_refused(pretrained: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "checkpoints"
    other.mkdir(parents=True)
    shutil.copy(pretrained / "run" / "checkpoints" / "step=4.ckpt", other / "step=4.ckpt")
    path = sweep_yaml(
        pretrained,
        output=str(tmp_path / "none"),
        starts=[],
        checkpoints=[str(other / "step=4.ckpt")],
    )
    with pytest.raises(MidtrainError, match=r"checkpoints\[0\]: .* is not a checkpoint of the run"):
        run_sweep(load_sweep(str(path)))
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_check_proxy_steps_orders_the_cpu_ablation_as_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The shipped CPU ablation (configs/study/ablation-cpu.yaml: code at weights 0.2 and 0.5
    from steps 10 and 30 of 60, SFT on the code target, 2 seeds) end to end, then 10-step
    proxies of its branches: the measured predictor orders the branches as the study measured
    them, the paper's token measure does not (it cannot tell the start steps apart)."""
    monkeypatch.chdir(tmp_path)  # the study's relative paths (data/, runs/) land here
    assert main(["experiment", "--config", "configs/study/ablation-cpu.yaml"]) == 0
    study = tmp_path / "runs" / "experiments" / "ablation-cpu"
    capsys.readouterr()
    assert main(["advise", "--check", str(study), "--proxy_steps", "10", "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| code | in_domain | proxy_seen | 5 | 10 | +1.000 | +1.000 |" in printed
    assert "| code | in_domain | proximity | 5 | 10 |" in printed
    with (study / "advise" / "calibration.csv").open() as f:
        rows = {(r["measure"], r["predictor"]): r for r in csv.DictReader(f)}
    assert float(rows[("in_domain", "proximity")]["kendall"]) < 1.0
    with (study / "advise" / "advice.csv").open() as f:
        advice = {r["candidate"]: r for r in csv.DictReader(f)}
    assert float(advice["baseline"]["proxy_seen"]) == 0.0
    # a re-run reuses every proxy and score
    assert main(["advise", "--check", str(study), "--proxy_steps", "10", "--bootstrap", "0"]) == 0
    assert capsys.readouterr().out.count("done already") == 6 + 6


def test_dirichlet_candidates_are_the_same_draws_at_every_start() -> None:
    """RegMix-style candidates: mixtures drawn from a symmetric Dirichlet, one proxy per draw
    and start step, named by draw; the pool to search is more draws of the same law."""
    from midtrain.study.sweep import SweepConfig, dirichlet_proxies, feature_row, pool_rows

    spec = {"domains": ["prose", "code", "math"], "samples": 4, "alpha": 0.5}
    starts = [(10, Path("a.ckpt")), (30, Path("b.ckpt"))]
    proxies = dirichlet_proxies(spec, starts, seed=0)
    assert [p.name for p in proxies] == [f"dirichlet{i}-s{s}" for s in (10, 30) for i in range(4)]
    assert [p.weights for p in proxies[:4]] == [p.weights for p in proxies[4:]]
    for p in proxies:
        assert p.weights and sum(p.weights.values()) == pytest.approx(1.0, abs=2e-3)
        assert p.checkpoint == Path("a.ckpt" if p.start == 10 else "b.ckpt")
    cfg = SweepConfig("o", "r", 3, {"dirichlet": spec}, "prose", {}, pool=50)
    base = {"prose": 1.0}
    pool = pool_rows(cfg, proxies, ["code", "math", "prose"], base)
    assert len(pool) == len(proxies) + 50 * 2  # the proxies, then 50 draws at both starts
    assert pool[0] == feature_row(proxies[0], ["code", "math", "prose"], base)
    with pytest.raises(MidtrainError, match=r"candidates.dirichlet.alpha: -1 is not > 0"):
        dirichlet_proxies({**spec, "alpha": -1}, starts, seed=0)
