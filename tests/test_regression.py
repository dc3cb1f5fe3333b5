"""`midtrain advise --fit`: the mixture regression recovers a known mixing law, works on a table
from outside midtrain, and refuses bad tables in one line with nothing written."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from midtrain.cli import main
from midtrain.errors import MidtrainError
from midtrain.study import regression
from midtrain.study.stats import kendall, spearman

pytest.importorskip("sklearn", reason="the mixture regression needs midtrain[advise]")


def law(w: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The planted mixing law: a floor of 2.0 plus an exponential in the domain weights (the
    Data Mixing Laws' form) and the start step."""
    return 2.0 + 1.5 * np.exp(-3.0 * w[:, 0] + 1.0 * w[:, 1] - 0.01 * start)


def write_runs(path: Path, n: int, seed: int, noise: float = 0.005, target: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    w = rng.dirichlet([1.0, 1.0, 1.0], n)
    start = rng.choice([10.0, 20.0, 40.0], n)
    y = law(w, start) + rng.normal(0.0, noise, n)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["run", "w_a", "w_b", "w_c", "start", *(["loss"] if target else [])])
        for i in range(n):
            out.writerow([f"run-{i}", *w[i], start[i], *([y[i]] if target else [])])
    return path


def test_recovers_a_known_mixing_law(tmp_path: Path) -> None:
    reg = regression.fit(str(write_runs(tmp_path / "train.csv", 40, 0)), "loss")
    assert reg.features == ["w_a", "w_b", "w_c", "start"]  # the run name is carried, not used
    assert reg.model == "mixing_law"  # cross-validation prefers the true form to the trees
    law_fit = reg.estimator
    assert law_fit.sign_ == 1 and law_fit.theta_[0] == pytest.approx(2.0, abs=0.05)  # the floor
    rng = np.random.default_rng(1)
    w = rng.dirichlet([1.0, 1.0, 1.0], 200)
    start = rng.uniform(10, 40, 200)
    pred, low, high = reg.predict(np.c_[w, start])
    truth = law(w, start)
    assert np.max(np.abs(pred - truth)) < 0.03
    assert spearman(pred, truth) > 0.99 and kendall(pred, truth) > 0.95
    # the interval is conformal: its half-width is a rank of the out-of-fold residuals
    chosen = next(s for s in reg.cv if s.model == reg.model)
    y = regression.column_values(regression.read_table(tmp_path / "train.csv"), "loss", "target")
    residuals = np.sort(np.abs(chosen.out_of_fold - y))
    assert reg.half_width == residuals[math.ceil(0.9 * 41) - 1] and reg.level == 0.9
    assert np.allclose(high - low, 2 * reg.half_width) and 0 < reg.half_width < 0.05


def test_conformal_width_is_the_rank_of_the_residuals() -> None:
    r = np.arange(1.0, 20.0)  # 19 residuals: ceil(0.9 * 20) = 18th smallest
    assert regression.conformal_half_width(r, 0.9) == (18.0, 0.9)
    assert regression.conformal_half_width(r[:5], 0.9) == (5.0, 5 / 6)  # too few: the largest


def test_command_writes_the_test_table_with_predictions(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    train = write_runs(tmp_path / "train.csv", 40, 0)
    test = write_runs(tmp_path / "test.csv", 30, 2)
    out = tmp_path / "pred.csv"
    assert main(["advise", "--fit", str(train), "--predict", str(test), "--target", "loss",
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| mixing_law |" in printed and "| gbt |" in printed
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and list(rows[0])[-3:] == ["predicted", "low", "high"]
    assert rows[0]["run"] == "run-0"
    pred = np.array([float(r["predicted"]) for r in rows])
    measured = np.array([float(r["loss"]) for r in rows])
    rho, tau = spearman(pred, measured), kendall(pred, measured)
    assert f"Spearman {rho:+.3f}, Kendall {tau:+.3f}" in printed and rho > 0.95


def test_a_table_from_outside_midtrain(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A RegMix-style swarm: an `index` column, weight columns named by a prefix, several
    metric columns with slashes; the features picked by a pattern, the test table without
    the target."""
    rng = np.random.default_rng(0)
    domains = ["arxiv", "github", "pile_cc"]

    def table(path: Path, n: int, with_target: bool) -> Path:
        w = rng.dirichlet([0.5] * 3, n)
        loss = 3.0 + np.exp(1.0 - 2.0 * w[:, 2] - 0.5 * w[:, 0])
        head = ["index", *(f"train_the_pile_{d}" for d in domains)]
        head += ["metric/the_pile_github_val_loss"] + (
            ["metric/the_pile_pile_cc_val_loss"] * with_target
        )
        with path.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(head)
            for i in range(n):
                out.writerow([i, *w[i], 2.0 + w[i, 1], *([loss[i]] * with_target)])
        return path

    train, test = table(tmp_path / "swarm.csv", 30, True), table(tmp_path / "new.csv", 10, False)
    args = ["--target", "metric/the_pile_pile_cc_val_loss", "--features", "train_the_pile_*"]
    out = tmp_path / "p.csv"
    assert (
        main(["advise", "--fit", str(train), "--predict", str(test), *args, "--out", str(out)]) == 0
    )
    assert "3 features" in capsys.readouterr().out
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and all(float(r["low"]) < float(r["high"]) for r in rows)


def _bad(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "train,test,extra,message",
    [
        ("a,b,y\n1,2,3\n2,3,4\n3,1,2\n4,4,4\n", "a,b\n1,2\n", ["--target", "loss"],
         "train.csv: no target column 'loss'"),
        ("a,b,y\n1,x,3\n2,3,4\n3,1,2\n4,4,4\n", "a,b\n1,2\n", ["--target", "y", "--features", "a,b"],
         "train.csv: feature column 'b' holds 'x' in row 2, not a finite number"),
        ("a,b,y\n1,2,3\n2,3,4\n3,1,2\n4,4,4\n", "a,c\n1,2\n", ["--target", "y"],
         "test.csv: its features differ from"),
        ("a,b,y\n1,2,3\n2,3,4\n3,1,2\n", "a,b\n1,2\n", ["--target", "y"],
         "y: 3 runs for 2 features; the regression needs at least features + 2 = 4 runs"),
        ("a,b,y\n1,2,3\n2,3,4\n3,1,2\n4,4,4\n", "a,b\n1,2\n", ["--target", "y", "--features", "z*"],
         "--features: 'z*' names no column"),
    ],
)  # fmt: skip
def test_bad_tables_are_one_line_and_nothing_is_written(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    train: str,
    test: str,
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "out" / "pred.csv"
    argv = ["advise", "--fit", str(_bad(tmp_path, "train.csv", train)),
            "--predict", str(_bad(tmp_path, "test.csv", test)), *extra, "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("midtrain advise: error: ") and "\n" not in err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_without_the_extra_the_command_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    train = write_runs(tmp_path / "train.csv", 10, 0)
    assert main(["advise", "--fit", str(train), "--predict", str(train), "--target", "loss"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "midtrain advise: error: advise --fit needs scikit-learn, which is not installed; "
        "pip install 'midtrain[advise]'"
    )


def test_library_api_on_a_table(tmp_path: Path) -> None:
    table = regression.read_table(write_runs(tmp_path / "t.csv", 30, 3))
    reg = regression.fit(table, "loss", ["w_*", "start"], model="gbt", level=0.8)
    assert reg.model == "gbt" and [s.model for s in reg.cv] == ["gbt"]
    pred = regression.predict_table(
        reg, regression.read_table(write_runs(tmp_path / "u.csv", 20, 4))
    )
    assert pred.measured is not None and math.isfinite(pred.spearman) and pred.spearman > 0.8
    with pytest.raises(MidtrainError, match=r"--model: 'svm' is not one of auto, gbt, mixing_law"):
        regression.fit(table, "loss", model="svm")
