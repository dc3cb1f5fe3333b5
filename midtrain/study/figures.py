"""The ablation's figures, drawn from summary.csv's rows: per grid and SFT target, in-domain
loss and forgetting against the start step, one line per weight, error bars = std over seeds,
the baseline dashed (``figure-<grid>-<target>-timing.png``); when the grid varies the ramp
length, the same against ramp steps, one line per start step and weight
(``figure-<grid>-<target>-ramp.png``). Every figure's plotted values are also written as
``figure-<...>.csv``. Drawing needs matplotlib (``pip install 'midtrain[plot]'``, the Agg
backend, headless); without it the CSVs are still written and the report says how to get the
figures."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLOT_HINT = "figures: not drawn, matplotlib is missing; pip install 'midtrain[plot]' to get them"
# panel -> (summary mean column, std column, y label)
PANELS = {
    "in_domain": ("in_domain_mean", "in_domain_std", "in-domain val loss (SFT target)"),
    "forgetting": ("forgetting_mean", "forgetting_std", "general val loss after SFT"),
}
FIGURE_COLUMNS = ["figure", "panel", "series", "x", "y", "yerr", "branch"]
BASELINE = "baseline"
NUMERIC = ("start_step", "weight", "ramp_steps", "best_lr", "seeds")


@dataclass
class Series:
    """One line of one panel: what ``draw`` plots, and what ``figure-<name>.csv`` holds."""

    panel: str
    label: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    yerr: list[float] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)


@dataclass
class FigureSpec:
    """A figure: its file stem, grid, SFT target, title, x axis label and the series of its
    two panels."""

    name: str
    grid: str
    target: str
    title: str
    xlabel: str
    series: list[Series]


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    return float(value)


def read_summary(path: str | Path) -> list[dict[str, Any]]:
    """summary.csv's rows with numbers as numbers (blank cells: None)."""
    rows = []
    with Path(path).open(newline="") as f:
        for r in csv.DictReader(f):
            rows.append(
                {
                    k: _number(v) if k in NUMERIC or k.endswith(("_mean", "_std")) else v
                    for k, v in r.items()
                }
            )
    return rows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


def _line(panel: str, label: str, rows: Iterable[Mapping[str, Any]], x: str) -> Series:
    mean, std, _ = PANELS[panel]
    s = Series(panel, label)
    for r in sorted(rows, key=lambda r: float(r[x])):
        s.x.append(float(r[x]))
        s.y.append(float(r[mean]))
        s.yerr.append(float(r[std] or 0.0))
        s.branches.append(str(r["branch"]))
    return s


def _baseline(panel: str, base: Mapping[str, Any] | None, xs: Sequence[float]) -> list[Series]:
    """The baseline as a flat line across the x range (it has no start step)."""
    if base is None:
        return []
    mean, std, _ = PANELS[panel]
    lo, hi = min(xs), max(xs)
    y, err = float(base[mean]), float(base[std] or 0.0)
    return [Series(panel, BASELINE, [lo, hi], [y, y], [err, err], [BASELINE, BASELINE])]


def _timing(grid: str, target: str, rows: list, base: Any, ramp: float, many: bool) -> FigureSpec:
    rows = [r for r in rows if r["ramp_steps"] == ramp]
    series = []
    for panel in PANELS:
        for w in sorted({r["weight"] for r in rows}):
            series.append(
                _line(panel, f"weight {w:g}", [r for r in rows if r["weight"] == w], "start_step")
            )
        series += _baseline(panel, base, [r["start_step"] for r in rows])
    suffix = f"-r{ramp:g}" if many else ""
    ramp_note = f", ramp {ramp:g} steps" if many else ""
    return FigureSpec(
        f"{_slug(grid)}-{_slug(target)}-timing{suffix}",
        grid,
        target,
        f"{grid} -> SFT {target}{ramp_note}",
        "start step",
        series,
    )


def _ramps(grid: str, target: str, rows: list, base: Any) -> FigureSpec:
    series = []
    points = sorted({(r["start_step"], r["weight"]) for r in rows})
    for panel in PANELS:
        for s, w in points:
            these = [r for r in rows if (r["start_step"], r["weight"]) == (s, w)]
            series.append(_line(panel, f"start {s:g}, weight {w:g}", these, "ramp_steps"))
        series += _baseline(panel, base, [r["ramp_steps"] for r in rows])
    return FigureSpec(
        f"{_slug(grid)}-{_slug(target)}-ramp",
        grid,
        target,
        f"{grid} -> SFT {target}",
        "ramp steps",
        series,
    )


def figure_specs(summary: Sequence[Mapping[str, Any]]) -> list[FigureSpec]:
    """The figures of every grid with more than one point, per SFT target, in a fixed order."""
    out = []
    grids = sorted({str(r["grid"]) for r in summary if r.get("grid")})
    for grid in grids:
        for target in sorted({str(r["target"]) for r in summary if r.get("grid") == grid}):
            rows = [r for r in summary if r.get("grid") == grid and r["target"] == target]
            base = next(
                (r for r in summary if r["branch"] == BASELINE and r["target"] == target), None
            )
            ramps = sorted({r["ramp_steps"] for r in rows})
            if len({(r["start_step"], r["weight"]) for r in rows}) > 1:
                out += [_timing(grid, target, rows, base, x, len(ramps) > 1) for x in ramps]
            if len(ramps) > 1:
                out.append(_ramps(grid, target, rows, base))
    return out


def write_series(spec: FigureSpec, path: Path) -> None:
    """The plotted values, one row per point: figure, panel, series, x, y, yerr, branch."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIGURE_COLUMNS)
        for s in spec.series:
            for x, y, e, b in zip(s.x, s.y, s.yerr, s.branches, strict=True):
                w.writerow([spec.name, s.panel, s.label, repr(x), repr(y), repr(e), b])


def draw(spec: FigureSpec) -> Any:
    """A matplotlib Figure of the spec, on the Agg canvas (headless; pyplot's global state is
    not touched): two panels, every series an errorbar line labelled as in the CSV."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PANELS))
    for ax, (panel, (_, _, ylabel)) in zip(axes, PANELS.items(), strict=True):
        for s in (s for s in spec.series if s.panel == panel):
            style = {"linestyle": "--", "color": "0.4"} if s.label == BASELINE else {"marker": "o"}
            ax.errorbar(s.x, s.y, yerr=s.yerr, capsize=3, label=s.label, **style)
        ax.set_xlabel(spec.xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(spec.title + " (mean ± std over seeds)")
    return fig


def write_figures(
    output: str | Path, summary: Sequence[Mapping[str, Any]]
) -> tuple[list[str], str | None]:
    """Write ``figure-<name>.csv`` and, with matplotlib, ``figure-<name>.png`` into ``output``
    for every figure of the summary; returns the PNG file names and, without matplotlib, the
    one line that says how to get them."""
    specs = figure_specs(summary)
    root = Path(output)
    for spec in specs:
        write_series(spec, root / f"figure-{spec.name}.csv")
    if not specs:
        return [], None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], PLOT_HINT
    names = []
    for spec in specs:
        fig = draw(spec)
        # no timestamp or version in the file: the same values give the same PNG
        fig.savefig(root / f"figure-{spec.name}.png", dpi=80, metadata={"Software": None})
        names.append(f"figure-{spec.name}.png")
    return names, None
