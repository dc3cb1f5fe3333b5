"""The token-statistics similarity: its fixed points, the formula, mixtures and the command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from midtrain.cli import main
from midtrain.data.store import Store
from midtrain.study.similarity import (
    blend,
    proximity_advantage,
    similarity,
    similarity_matrix,
    token_counts,
)


def test_identical_is_one_and_disjoint_is_the_formula_value() -> None:
    a = np.array([5, 3, 2, 0, 0, 0, 0])
    assert similarity(a, a.copy()) == pytest.approx(1.0)
    assert similarity(a, a * 7) == pytest.approx(1.0)  # frequencies, not counts
    b = np.array([0, 0, 0, 4, 4, 1, 0])
    # cosine 0, Jaccard 0, JSD of disjoint supports = 1 bit: 0.3 / (1 + 1)
    assert similarity(a, b) == pytest.approx(0.15)


def test_formula_on_a_hand_example() -> None:
    a, b = np.array([2, 2, 0]), np.array([2, 0, 2])
    p, q = np.array([0.5, 0.5, 0]), np.array([0.5, 0, 0.5])
    m = (p + q) / 2
    jsd = 0.5 * (0.5 * np.log2(0.5 / 0.5) + 0.5 * np.log2(0.5 / 0.25)) * 2
    expected = (
        0.4 * (p @ q) / (np.linalg.norm(p) * np.linalg.norm(q)) + 0.3 * (1 / 3) + 0.3 / (1 + jsd)
    )
    assert m.sum() == pytest.approx(1)
    assert similarity(a, b) == pytest.approx(expected)
    assert similarity(a, b) == pytest.approx(similarity(b, a))


def test_top_k_restricts_the_vocabulary() -> None:
    a = np.array([100, 1, 0, 0])
    b = np.array([100, 0, 1, 0])
    assert similarity(a, b, top_k=1) == pytest.approx(1.0)  # only token 0 is compared
    assert similarity(a, b, top_k=2) < 1.0


def test_mixtures_blend_toward_their_parts(builtin_store: Path) -> None:
    store = Store(builtin_store)
    names, m = similarity_matrix(
        store,
        ["prose", "code", "math"],
        num_docs=40,
        top_k=300,
        mixtures={"mix": {"prose": 0.8, "code": 0.2}, "pure": {"code": 1.0}},
    )
    i = {n: k for k, n in enumerate(names)}
    assert np.allclose(m, m.T) and np.allclose(np.diag(m), 1.0)
    assert m[i["pure"], i["code"]] == pytest.approx(1.0, abs=1e-6)
    # the mixture sits between prose and code as seen from code
    assert m[i["prose"], i["code"]] < m[i["mix"], i["code"]] < 1.0
    counts = {d: token_counts(store, d, 40) for d in ("prose", "code")}
    advantage = proximity_advantage(
        counts, {"prose": 1.0}, {"prose": 0.8, "code": 0.2}, counts["code"], 300
    )
    assert advantage > 0
    assert advantage == pytest.approx(m[i["mix"], i["code"]] - m[i["prose"], i["code"]], abs=1e-6)
    c = {"x": np.array([1, 0]), "y": np.array([0, 3])}
    assert np.allclose(blend(c, {"x": 1, "y": 3}) / 1e12, [0.25, 0.75])


def test_similarity_command_writes_csv_and_markdown(
    builtin_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert (
        main(
            [
                "similarity",
                "--store",
                str(builtin_store),
                "--domains",
                "[prose, math]",
                "--num_docs",
                "20",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "| prose | 1.000 |" in capsys.readouterr().out
    rows = (tmp_path / "similarity.csv").read_text().splitlines()
    assert rows[0] == ",prose,math" and len(rows) == 3
    assert (tmp_path / "similarity.md").read_text().startswith("| | prose | math |")
    assert main(["similarity", "--store", str(builtin_store), "--domains", "[poetry]"]) == 2
