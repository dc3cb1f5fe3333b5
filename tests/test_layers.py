"""The package layout's import rule, checked on the source with ``ast``: each layer imports
only from the layers below it (and itself), so the tree says who owns what.

    errors  <-  run_state, configs  <-  data  <-  model  <-  checkpoint  <-  train  <-  evaluation, study  <-  cli

The facades users import (``midtrain``, ``midtrain.callbacks``, ``midtrain.lm``) sit on top.
Function-level imports count too: a deferred import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "midtrain"
RANK = {
    "errors": 0,
    "run_state": 1,
    "configs": 1,
    "data": 2,
    "model": 3,
    "checkpoint": 4,
    "train": 5,
    "evaluation": 6,
    "study": 6,
    "cli": 7,
}
FACADES = {"__init__", "__main__", "callbacks", "lm"}


def layer(module: str) -> str:
    """``midtrain.train.callbacks.mixture`` -> ``train``; a facade -> its own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "midtrain":  # `from midtrain import x`: x may be a module
                names = [f"midtrain.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n.split(".")[0] == "midtrain"]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "midtrain"
            ]
    return sorted(found)


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer() -> None:
    for path in sources():
        rel = path.relative_to(PACKAGE)
        top = rel.parts[0].removesuffix(".py")
        assert top in RANK or top in FACADES, f"{rel}: not in any layer of {sorted(RANK)}"


def violations(path: Path, own: str) -> list[str]:
    """Every import in ``path`` (a module of layer ``own``) that does not point down."""
    found = []
    for lineno, module in imported_modules(path):
        other = layer(module)
        if other in FACADES:
            found.append(f"{path.name}:{lineno} imports the facade {module}")
        elif other not in RANK:
            found.append(f"{path.name}:{lineno} imports {module}, which is in no layer")
        elif other != own and RANK[other] >= RANK[own]:
            found.append(
                f"{path.name}:{lineno}: {own} (layer {RANK[own]}) imports {module} "
                f"({other}, layer {RANK[other]})"
            )
    return found


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    if own not in FACADES:
        assert violations(path, own) == [], f"imports point down only: {RANK}"


def test_the_rule_catches_upward_and_sideways_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from midtrain.errors import MidtrainError\n"
        "def f():\n    from midtrain.cli.fit import say\n"
        "from midtrain import train\n"
        "import midtrain.study.plan\n"
    )
    found = violations(bad, "train")
    assert [line.split(":")[1].split()[0] for line in found] == ["3", "5"]
    assert "midtrain.cli.fit" in found[0] and "midtrain.study.plan" in found[1]
    assert violations(bad, "cli") == []


# The size rule: no function in midtrain/ has a body over MAX_BODY_LINES lines, counted from its
# first statement after the docstring to the end of its last one (blank and comment lines
# inside count; the signature, decorators and docstring do not); a nested function counts in
# its parent too. No class is defined inside a function: a class is a module-level name.
MAX_BODY_LINES = 60


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
        body = body[1:]
    if not body:
        return 0
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1


def habit_violations(path: Path) -> list[str]:
    """Every function of ``path`` over the size rule and every class inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        lines = _body_lines(node)
        if lines > MAX_BODY_LINES:
            found.append(
                f"{path.name}:{node.lineno} {node.name}() has {lines} body lines "
                f"(at most {MAX_BODY_LINES}): split it"
            )
        found += [
            f"{path.name}:{inner.lineno} class {inner.name} is defined inside {node.name}(): "
            "move it to module level"
            for inner in ast.walk(node)
            if isinstance(inner, ast.ClassDef)
        ]
    return found


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_are_short_and_classes_top_level(path: Path) -> None:
    assert habit_violations(path) == []


def test_the_size_rule_catches_long_functions_and_inner_classes(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_BODY_LINES))
    bad = tmp_path / "bad.py"
    bad.write_text(
        f'def fits():\n    """A docstring does not count."""\n{body}'
        f"def too_long():\n{body}    return x0\n"
        "class Top:\n    def method(self):\n        class Inner:\n            pass\n"
    )
    found = habit_violations(bad)
    assert len(found) == 2, found
    assert "too_long() has 61 body lines" in found[0]
    assert "class Inner is defined inside method()" in found[1]
