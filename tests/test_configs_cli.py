"""Ready-made configs by name from any directory, `midtrain configs`, and `midtrain demo --help`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from midtrain.cli import main
from midtrain.configs import packaged_configs

SHIPPED = sorted(
    p.relative_to(packaged_configs()).as_posix() for p in packaged_configs().rglob("*.yaml")
)


def _print_config(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", ["configs/pretrain/demo.yaml", "pretrain/demo.yaml"])
def test_fit_config_by_name_from_any_directory(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = _print_config(["fit", "--config", name], capsys)
    assert cfg["trainer"]["max_steps"] == 300 and cfg["data"]["init_args"]["store"] == "data/demo"
    stacked = _print_config(
        ["validate", "--config=configs/pretrain/cpu.yaml", "-c", "midtrain/cpu-code.yaml"], capsys
    )
    assert stacked["trainer"]["callbacks"][0]["init_args"]["step"] == 40


def test_tool_config_by_name_and_local_file_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert (
        _print_config(["prepare", "--config", "configs/prepare/demo.yaml"], capsys)["output"]
        == "data/demo"
    )
    local = tmp_path / "configs" / "prepare" / "demo.yaml"
    local.parent.mkdir(parents=True)
    local.write_text(
        (packaged_configs() / "prepare/demo.yaml")
        .read_text()
        .replace("output: data/demo", "output: data/mine")
    )
    assert (
        _print_config(["prepare", "--config", "configs/prepare/demo.yaml"], capsys)["output"]
        == "data/mine"
    )


def test_configs_list_show_copy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["configs", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in SHIPPED)
    assert main(["configs", "show", "configs/pretrain/demo.yaml"]) == 0
    assert capsys.readouterr().out == (packaged_configs() / "pretrain/demo.yaml").read_text()

    assert main(["configs", "copy", "pretrain/demo.yaml", str(tmp_path / "mine.yaml")]) == 0
    assert main(["configs", "copy", "pretrain/demo.yaml", f"{tmp_path}/into/"]) == 0
    assert main(["configs", "copy", "strategy", str(tmp_path / "strategies")]) == 0
    assert (tmp_path / "mine.yaml").read_text() == (tmp_path / "into" / "demo.yaml").read_text()
    assert sorted(p.name for p in (tmp_path / "strategies").iterdir()) == ["ddp.yaml", "fsdp2.yaml"]


def test_configs_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "strategies").mkdir()
    (tmp_path / "strategies" / "ddp.yaml").write_text("mine\n")
    capsys.readouterr()
    assert main(["configs", "copy", "strategy", str(tmp_path / "strategies")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ddp.yaml exists" in err
    assert sorted(p.name for p in (tmp_path / "strategies").iterdir()) == ["ddp.yaml"]
    assert (tmp_path / "strategies" / "ddp.yaml").read_text() == "mine\n"  # untouched

    for args in (
        ["configs", "show", "pretrain/nope.yaml"],
        ["configs", "copy", "../x", "y"],
        ["configs", "frobnicate"],
        ["configs"],
    ):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("midtrain configs: error:"), err
    assert main(["fit", "--config", "pretrain/nope.yaml"]) == 2
    assert "pretrain/nope.yaml" in capsys.readouterr().err


def test_demo_help_is_its_own(capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: midtrain demo ")
    assert "--output DIR" in out and "required" not in out


def test_configs_list_shows_every_description_whole(capsys: pytest.CaptureFixture) -> None:
    from midtrain.cli.configs import _summary

    assert main(["configs", "list"]) == 0
    listed = " ".join(capsys.readouterr().out.split())  # the wrapping undone
    root = packaged_configs()
    for path in sorted(root.rglob("*.yaml")):
        description = _summary(path)
        assert description, f"{path}: its first line should be a comment saying what it is"
        assert " ".join(description.split()) in listed
    # a description continued on the next comment line is not cut after its first line
    assert _summary(root / "pretrain/paper.yaml").endswith("devices = 1024.")
