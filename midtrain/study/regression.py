"""A mixture regression on any table of runs (``midtrain advise --fit TRAIN --predict TEST``):
one row per run, feature columns (domain weights, start step, ramp length, ...) and a measured
target; predicts the target of new rows with an interval.

Two models, chosen by K-fold cross-validation (the lower out-of-fold RMSE):

* ``gbt``: gradient-boosted trees (scikit-learn's ``GradientBoostingRegressor``), the model
  RegMix fits on its proxy swarm (there LightGBM);
* ``mixing_law``: ``y = c + s * exp(b + w . z)`` with ``z`` the standardized features and
  ``s = +1`` (a loss above its floor ``c``) or ``-1`` (a score below its ceiling), the form of
  the Data Mixing Laws, fitted by least squares (SciPy's ``least_squares``) with a small ridge
  penalty on ``w``. It is monotone along every direction, so it extrapolates smoothly but cannot
  place an optimum inside the simplex; the trees can.

The interval is conformal, from the cross-validation's own residuals: its half-width is the
``ceil(level * (n + 1))``-th smallest absolute out-of-fold residual of the chosen model among
the ``n`` training runs (with fewer than ``1 / (1 - level) - 1`` runs that rank does not exist;
the largest residual is used and the level it gives, ``n / (n + 1)``, is reported instead). A
new run drawn like the training runs falls inside it about ``level`` of the time; it is not a
guarantee for mixtures unlike any trained on.

The models come from the optional extra ``midtrain[advise]`` (scikit-learn, which brings SciPy).
"""

from __future__ import annotations

import csv
import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from midtrain.errors import MidtrainError
from midtrain.study.stats import kendall, spearman

MODELS = ("gbt", "mixing_law")
EXTRA = "pip install 'midtrain[advise]'"
PREDICTED = ("predicted", "low", "high")  # the columns a prediction adds to a table


@dataclass(frozen=True)
class Table:
    """A CSV table: its path (for messages), column names in order and rows of raw cells."""

    path: str
    columns: list[str]
    rows: list[dict[str, str]]


def read_table(path: str | Path, what: str = "table") -> Table:
    """A CSV file with a header row; a one-line error for a missing or empty file."""
    p = Path(path)
    if not p.is_file():
        raise MidtrainError(f"{what}: {path} not found; give a CSV file with a header row")
    with p.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if any((v or "").strip() for v in r.values())]
        columns = list(reader.fieldnames or [])
    if not columns or not rows:
        raise MidtrainError(f"{what}: {path} has no rows under a header; give a CSV table of runs")
    if len(set(columns)) != len(columns):
        raise MidtrainError(f"{what}: {path} repeats a column name in its header")
    return Table(str(path), columns, rows)


def _number(cell: str | None) -> float | None:
    try:
        value = float((cell or "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def column_values(table: Table, column: str, role: str) -> np.ndarray:
    """A column as floats; one line naming the table, column and row of a cell that is not a
    finite number."""
    out = []
    for i, row in enumerate(table.rows, 2):  # row 1 is the header
        value = _number(row.get(column))
        if value is None:
            raise MidtrainError(
                f"{table.path}: {role} column {column!r} holds {row.get(column)!r} in row {i}, "
                "not a finite number; fix the cell or leave the column out of --features"
            )
        out.append(value)
    return np.array(out, dtype=np.float64)


def numeric_columns(table: Table) -> list[str]:
    """Columns where at least one cell is a number (a column of only words is an identifier,
    carried along but never a feature)."""
    return [c for c in table.columns if any(_number(r.get(c)) is not None for r in table.rows)]


def select_features(table: Table, target: str, features: Sequence[str] | None) -> list[str]:
    """The feature columns: the given names or shell patterns (``train_*``) in table order,
    or every numeric column but the target."""
    if target not in table.columns:
        raise MidtrainError(
            f"{table.path}: no target column {target!r} (columns: {', '.join(table.columns)})"
        )
    if not features:
        chosen = [c for c in numeric_columns(table) if c != target]
    else:
        chosen = []
        for pattern in features:
            found = [c for c in table.columns if fnmatch.fnmatchcase(c, pattern) and c != target]
            if not found:
                raise MidtrainError(
                    f"--features: {pattern!r} names no column of {table.path} but the target "
                    f"(columns: {', '.join(table.columns)})"
                )
            chosen += [c for c in found if c not in chosen]
    if not chosen:
        raise MidtrainError(f"{table.path}: no numeric feature column besides {target!r}")
    return chosen


def check_test_features(
    train: Table, test: Table, target: str, features: list[str], given: bool
) -> None:
    """TEST must hold TRAIN's features; without ``--features``, exactly its numeric columns."""
    missing = [c for c in features if c not in test.columns]
    extra = []
    if not given:
        extra = [c for c in numeric_columns(test) if c != target and c not in features]
    if missing or extra:
        said = [f"lacks {', '.join(missing)}"] if missing else []
        said += [f"has {', '.join(extra)} besides them"] if extra else []
        raise MidtrainError(
            f"{test.path}: its features differ from {train.path}'s ({' and '.join(said)}); "
            "give tables with the same feature columns, or name them with --features"
        )


class MixingLaw:
    """``y = c + s * exp(b + w . z)``, z the standardized features (Data Mixing Laws' form)."""

    def __init__(self, alpha: float = 1e-3) -> None:
        self.alpha = alpha  # ridge weight on w, relative to the target's spread

    def _z(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean_) / self.scale_

    def fit(self, x: np.ndarray, y: np.ndarray) -> MixingLaw:
        from scipy.optimize import least_squares

        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        self.mean_ = x.mean(axis=0)
        std = x.std(axis=0)
        self.scale_ = np.where(std > 0, std, 1.0)
        z = self._z(x)
        spread = float(y.std()) or 1.0
        span = float(y.max() - y.min()) or spread
        best: tuple[float, int, np.ndarray] | None = None
        for sign in (1, -1):
            floor = (y.min() if sign == 1 else y.max()) - sign * 0.5 * span
            design = np.c_[np.ones(len(y)), z]
            start = np.linalg.lstsq(design, np.log(sign * (y - floor)), rcond=None)[0]

            def residuals(theta: np.ndarray, s: int = sign) -> np.ndarray:
                pred = theta[0] + s * np.exp(np.clip(theta[1] + z @ theta[2:], -60, 60))
                return np.r_[(pred - y) / spread, math.sqrt(self.alpha) * theta[2:]]

            fitted = least_squares(residuals, np.r_[floor, start])
            cost = float(fitted.cost)
            if best is None or cost < best[0]:
                best = (cost, sign, fitted.x)
        assert best is not None
        _, self.sign_, self.theta_ = best
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        t = self.theta_
        return t[0] + self.sign_ * np.exp(np.clip(t[1] + self._z(x) @ t[2:], -60, 60))


def _gbt(n: int, seed: int) -> Any:
    from sklearn.ensemble import GradientBoostingRegressor

    # shallow trees and a slow rate: proxy tables hold tens to hundreds of runs
    return GradientBoostingRegressor(
        n_estimators=300,
        learning_rate=0.05,
        max_depth=3,
        subsample=0.8 if n >= 20 else 1.0,
        min_samples_leaf=max(1, min(5, n // 20)),
        random_state=seed,
    )


def make_model(name: str, n: int, seed: int) -> Any:
    """A fresh, unfitted model: ``gbt`` or ``mixing_law``."""
    return _gbt(n, seed) if name == "gbt" else MixingLaw()


def require_extra() -> None:
    """One line naming the extra when scikit-learn is missing."""
    try:
        import scipy.optimize  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        raise MidtrainError(
            f"advise --fit needs scikit-learn, which is not installed; {EXTRA}"
        ) from None


@dataclass(frozen=True)
class CVScore:
    """A model's out-of-fold predictions over the training runs and how well they did."""

    model: str
    rmse: float
    spearman: float
    kendall: float
    out_of_fold: np.ndarray = field(repr=False, compare=False)


def cross_validate(name: str, x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> CVScore:
    from sklearn.model_selection import KFold

    oof = np.empty_like(y)
    for train, held in KFold(folds, shuffle=True, random_state=seed).split(x):
        oof[held] = make_model(name, len(train), seed).fit(x[train], y[train]).predict(x[held])
    rmse = float(np.sqrt(np.mean((oof - y) ** 2)))
    return CVScore(name, rmse, spearman(oof, y), kendall(oof, y), oof)


@dataclass
class MixtureRegression:
    """A fitted regression: which model won the cross-validation, its scores, and the interval
    half-width (``level`` of new runs like the training ones fall within it)."""

    target: str
    features: list[str]
    model: str
    estimator: Any
    cv: list[CVScore]
    half_width: float
    level: float
    runs: int

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted target with the interval's low and high ends, for rows of features."""
        pred = np.asarray(self.estimator.predict(np.asarray(x, dtype=np.float64)), np.float64)
        return pred, pred - self.half_width, pred + self.half_width

    def summary(self) -> str:
        lines = [
            f"fit: {self.runs} runs, {len(self.features)} features, target {self.target}; "
            f"{min(5, self.runs)}-fold cross-validation (out-of-fold):",
            "| model | RMSE | Spearman | Kendall | |",
            "|---|---|---|---|---|",
        ]
        for s in self.cv:
            chosen = "chosen" if s.model == self.model else ""
            lines.append(
                f"| {s.model} | {s.rmse:.4g} | {s.spearman:+.3f} | {s.kendall:+.3f} | {chosen} |"
            )
        lines.append(
            f"interval: predicted ± {self.half_width:.4g} ({self.level:.0%}, conformal from the "
            f"{self.runs} out-of-fold residuals of {self.model})"
        )
        return "\n".join(lines)


def conformal_half_width(residuals: np.ndarray, level: float) -> tuple[float, float]:
    """The half-width and the level it gives: the ceil(level (n + 1))-th smallest |residual|."""
    r = np.sort(np.abs(residuals))
    n = len(r)
    k = math.ceil(level * (n + 1))
    if k > n:
        return float(r[-1]), n / (n + 1)
    return float(r[k - 1]), level


def fit_arrays(
    x: np.ndarray,
    y: np.ndarray,
    features: list[str],
    target: str,
    model: str = "auto",
    level: float = 0.9,
    seed: int = 0,
) -> MixtureRegression:
    """Cross-validate the models on (x, y), keep the best (or ``model``), refit on all rows."""
    require_extra()
    if model not in ("auto", *MODELS):
        raise MidtrainError(f"--model: {model!r} is not one of auto, {', '.join(MODELS)}")
    if not 0 < level < 1:
        raise MidtrainError(f"--level: {level} is not in (0, 1)")
    n = len(y)
    if n < len(features) + 2:
        raise MidtrainError(
            f"{target}: {n} runs for {len(features)} features; the regression needs at least "
            f"features + 2 = {len(features) + 2} runs: add runs or name fewer --features"
        )
    names = MODELS if model == "auto" else (model,)
    cv = [cross_validate(name, x, y, min(5, n), seed) for name in names]
    best = min(cv, key=lambda s: s.rmse if math.isfinite(s.rmse) else math.inf)
    estimator = make_model(best.model, n, seed).fit(x, y)
    width, reached = conformal_half_width(best.out_of_fold - y, level)
    return MixtureRegression(target, features, best.model, estimator, cv, width, reached, n)


def fit(
    train: Table | str,
    target: str,
    features: Sequence[str] | None = None,
    model: str = "auto",
    level: float = 0.9,
    seed: int = 0,
) -> MixtureRegression:
    """Fit the mixture regression on a table of runs (a path or a ``Table``).

    Args:
        train: one row per run: feature columns and the measured ``target``.
        target: the column to predict.
        features: column names or shell patterns (``train_*``); default every numeric column
            but the target (a column of only words, e.g. a run name, is carried, not used).
        model: ``auto`` (cross-validation picks), ``gbt`` or ``mixing_law``.
        level: the interval's coverage, e.g. 0.9.
        seed: folds and trees.
    """
    table = read_table(train, "--fit") if isinstance(train, str) else train
    chosen = select_features(table, target, features)
    x = np.stack([column_values(table, c, "feature") for c in chosen], axis=1)
    y = column_values(table, target, "target")
    return fit_arrays(x, y, chosen, target, model, level, seed)


@dataclass
class Predictions:
    """A test table with the predicted target and its interval per row, and, when the table has
    the target, rank agreement between predicted and measured."""

    table: Table
    predicted: np.ndarray
    low: np.ndarray
    high: np.ndarray
    measured: np.ndarray | None
    spearman: float = math.nan
    kendall: float = math.nan

    def rows(self) -> list[dict[str, Any]]:
        return [
            {**row, "predicted": p, "low": lo, "high": hi}
            for row, p, lo, hi in zip(
                self.table.rows, self.predicted, self.low, self.high, strict=True
            )
        ]


def predict_table(reg: MixtureRegression, test: Table) -> Predictions:
    """Predict every row of ``test`` (which must hold the features); Spearman and Kendall when
    it holds the target too."""
    x = np.stack([column_values(test, c, "feature") for c in reg.features], axis=1)
    pred, low, high = reg.predict(x)
    out = Predictions(test, pred, low, high, None)
    if reg.target in test.columns:
        out.measured = column_values(test, reg.target, "target")
        out.spearman = spearman(pred, out.measured)
        out.kendall = kendall(pred, out.measured)
    return out


def write_predictions(pred: Predictions, out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [c for c in pred.table.columns if c not in PREDICTED] + list(PREDICTED)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(pred.rows())
    return path


def plot_predictions(pred: Predictions, path: Path, title: str) -> Path | None:
    """Predicted (with its interval) against measured, one point per test run; None without
    matplotlib (the ``midtrain[plot]`` extra) or without a measured target."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    if pred.measured is None:
        return None
    fig = Figure(figsize=(5, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    err = [pred.predicted - pred.low, pred.high - pred.predicted]
    ax.errorbar(pred.measured, pred.predicted, yerr=err, fmt="o", ms=3, alpha=0.6, elinewidth=0.6)
    lo = float(min(pred.measured.min(), pred.low.min()))
    hi = float(max(pred.measured.max(), pred.high.max()))
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8)
    ax.set_xlabel("measured")
    ax.set_ylabel("predicted (interval)")
    ax.set_title(f"{title}\nSpearman {pred.spearman:+.3f}, Kendall {pred.kendall:+.3f}", fontsize=9)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path


def run(
    fit_path: str,
    predict_path: str,
    target: str,
    features: Sequence[str] | None,
    out: str,
    model: str = "auto",
    level: float = 0.9,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> Predictions:
    """``midtrain advise --fit``: every check before the fit, the fit, then the file."""
    require_extra()
    train = read_table(fit_path, "--fit")
    test = read_table(predict_path, "--predict")
    chosen = select_features(train, target, features)
    check_test_features(train, test, target, chosen, bool(features))
    for c in chosen:  # both tables' cells, before any fitting
        column_values(test, c, "feature")
    if Path(out).is_dir():
        raise MidtrainError(f"--out: {out} is a directory; give the CSV file to write")
    reg = fit(train, target, chosen, model, level, seed)
    say(reg.summary())
    pred = predict_table(reg, test)
    if pred.measured is not None:
        say(
            f"test: {len(test.rows)} runs of {test.path}: Spearman {pred.spearman:+.3f}, "
            f"Kendall {pred.kendall:+.3f} (predicted vs measured {target})"
        )
    written = [write_predictions(pred, out)]
    title = f"{reg.model} on {Path(fit_path).name} -> {Path(predict_path).name}: {target}"
    figure = plot_predictions(pred, Path(out).with_suffix(".png"), title)
    say("written " + ", ".join(str(p) for p in [*written, *([figure] if figure else [])]))
    return pred
