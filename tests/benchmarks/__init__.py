"""Benchmarks: figures, not assertions (`tox -e bench`, `tox -e bench-anchor`)."""

from __future__ import annotations

import json
import sys
from typing import Any


def print_figures(rows: list[tuple[str, str, str, str]], result: dict[str, Any]) -> None:
    """A benchmark module run alone: its table rows (name, figure, detail, goal), then its
    JSON."""
    for name, fig, detail, goal in rows:
        print(f"{name:<52} {fig:>12}  {detail:<28} {goal}")
    json.dump(result, sys.stdout, indent=2)
    print()
