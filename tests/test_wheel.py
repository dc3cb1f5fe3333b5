"""midtrain works after a plain (non-editable) install, from any directory: the wheel carries
the ready-made configs, and `--config configs/...` finds them.

The wheel is built from a copy of the sources (the checkout stays clean) and installed with
`--no-deps` into a fresh venv; that venv sees this environment's dependencies (torch, Lightning,
...) through a .pth file, so nothing is downloaded or reinstalled. Every command then runs from
an empty directory with no PYTHONPATH, so only the installed wheel can answer.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(
        ROOT / "midtrain", src / "midtrain", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            *isolation,
            "-q",
            "-w",
            str(work / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = (work / "dist").glob("midtrain-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed and this environment's packages visible."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    inner = subprocess.run(
        [str(_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(inner) / "_outer_env.pth").write_text("\n".join(sorted(outer)) + "\n")
    # --ignore-installed: where midtrain is installed in this environment too (tox), pip would
    # see that copy through the .pth and skip the wheel
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(_python(venv)),
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    return venv


def _run(venv: Path, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{_python(venv).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"{' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    )
    return done


def test_wheel_ships_every_config(wheel: Path) -> None:
    shipped = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "midtrain" / "configs").rglob("*.yaml")
    }
    with zipfile.ZipFile(wheel) as z:
        in_wheel = {
            n for n in z.namelist() if n.startswith("midtrain/configs/") and n.endswith(".yaml")
        }
    assert shipped and shipped == in_wheel


def test_installed_midtrain_finds_its_configs_from_any_directory(
    venv: Path, tmp_path: Path
) -> None:
    where = _run(
        venv, tmp_path, str(_python(venv)), "-c", "import midtrain; print(midtrain.__file__)"
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), (
        where.stdout
    )  # the wheel, not the checkout

    listed = _run(venv, tmp_path, "midtrain", "configs", "list").stdout
    assert "pretrain/demo.yaml" in listed and "study/cpu.yaml" in listed

    printed = _run(
        venv,
        tmp_path,
        "midtrain",
        "fit",
        "--config",
        "configs/pretrain/demo.yaml",
        "--print_config",
    ).stdout
    assert yaml.safe_load(printed)["data"]["init_args"]["store"] == "data/demo"

    help_text = _run(venv, tmp_path, "midtrain", "demo", "--help").stdout
    assert help_text.startswith("usage: midtrain demo") and "--output DIR" in help_text

    # a short prepare of the demo data, from a copy of the shipped config
    _run(venv, tmp_path, "midtrain", "configs", "copy", "prepare/demo.yaml", "prepare.yaml")
    config = yaml.safe_load((tmp_path / "prepare.yaml").read_text())
    config["tokenizer"]["train"] = {"vocab_size": 512, "sample_docs": 100}
    config["domains"]["prose"]["max_docs"] = 40
    config["domains"]["code"]["max_docs"] = 20
    config["domains"]["math"]["source"]["num_problems"] = 200
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump(config))
    _run(venv, tmp_path, "midtrain", "prepare", "--config", "prepare.yaml")
    assert (tmp_path / "data" / "demo" / "store.json").is_file()
    assert not (tmp_path / "configs").exists()  # nothing was looked up next to the user


@pytest.mark.slow
def test_installed_demo_runs_from_any_directory(venv: Path, tmp_path: Path) -> None:
    """The whole CPU study (`midtrain demo`, ~6 minutes on 2 cores) from an empty directory."""
    out = _run(venv, tmp_path, "midtrain", "demo", timeout=3600).stdout
    assert (tmp_path / "runs" / "experiments" / "cpu" / "results.md").is_file(), out[-2000:]
