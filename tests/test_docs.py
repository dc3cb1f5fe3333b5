"""Every command in README.md and docs/*.md runs verbatim (with the overrides below).

Which blocks run (the rule for writing docs):
- Every fenced block names its language. ```bash, ```sh, ```shell and ```console blocks are
  commands and are executed; any other language is not (```text for output, and for commands
  that need the Hugging Face hub or a GPU, with a sentence saying so; ```yaml, ```python, ...).
  A bare ``` fence is an error: write ```bash (run it) or ```text (show it).
- In a command block each line is one command; a trailing backslash continues it, `# ...`
  comments and blank lines are dropped; in ```console blocks only `$ ` lines are commands.
- A ```yaml block whose first line is a comment naming a file (`# shared.yaml`) is written to
  that file before the page's next commands run: the reader is told to save it under that name.
- An executed command must not need the hub or a GPU (`NEEDS_HUB_OR_GPU`): this test fails
  on one that does, pointing at the rule above.

How they run:
- One sandbox per page, a temp dir `repo/` holding a link to this checkout's `configs` and
  `tests`, with `shared/` beside it (the real sample data, as `../shared` is for a checkout).
  `data/demo` (`midtrain prepare --config configs/prepare/demo.yaml`) is built once per
  session and copied in, so a page's own prepare of it is the quick "reused" second run.
- A page's commands run in order (later ones use earlier ones' runs), each with bash from the
  sandbox, with this interpreter's `midtrain` and `python` first on PATH and this checkout
  first on PYTHONPATH. Shell operators (`;`, `&&`, `||`, `|`) keep their meaning; each
  segment is handled by its program (see `_segment`):
  - `midtrain <command>`: `OVERRIDES[command]` appended, except keys the command sets itself;
  - `pip install ...`: not run (it would change this environment); what it installs is
    checked instead: `.`/`-e .` with extras that pyproject.toml declares, `torch==X` equal to
    tox.ini's pin. The wheel test (test_wheel.py) installs midtrain for real;
  - `tox ...`: not run (it runs this suite); the `-e` environments must exist in tox.ini;
  - `tensorboard --logdir DIR`: not run (a server); DIR must hold an events file by then;
  - anything else (`python -c ...`, `ls`, ...): run as written.
- `test_page_commands` runs every command but the `SLOW` ones (the whole study) and the
  `SLOW_PAGES` (which only repeat other pages' commands); the slow test
  `test_page_commands_slow` runs all commands of those pages, so each runs in at least one.
- A failure names the page, the line and the command, with the end of its output.
- Pages that read `../shared` data are skipped when it is absent (see conftest.py); pages
  whose commands need an optional extra (NEEDS_EXTRA) are skipped where it is not installed.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}

# The tiny overrides, in one place: appended to every `midtrain <command>` of the docs unless
# the command sets the key itself (a page's own quick-try values win).
OVERRIDES: dict[str, dict[str, str]] = {
    "fit": {
        "trainer.max_steps": "4",  # the demo's 300 steps: 4
        "trainer.num_sanity_val_steps": "0",
        "trainer.enable_progress_bar": "false",
    },
    "validate": {"trainer.enable_progress_bar": "false"},
    "test": {"trainer.enable_progress_bar": "false"},
    # prepare: the demo store is pre-built (see above); experiment/demo are slow (below)
}

# Commands that take minutes (the CPU study end to end): only in the slow test.
SLOW = [r"^midtrain demo(?!.*--(dry_run|help))", r"^midtrain experiment(?!.*--(dry_run|help))"]
# Pages whose commands all repeat other pages' (run there in the fast test): only in the slow
# test, to keep the fast one short. test_slow_pages_only_repeat_other_pages keeps this honest.
SLOW_PAGES = {"README.md", "docs/index.md"}

# What an executed command may not need (such commands go in ```text blocks with a note).
NEEDS_HUB_OR_GPU = [
    (r"\bhf:(?![./~])", "a hub model (hf:<id>; a local directory hf:/path or hf:./path is fine)"),
    (r"--\S*\bhub[ =]", "a hub tokenizer"),
    (
        r"configs/\S*paper\S*\.yaml(?!.*--(print_config|dry_run|help))",
        "the paper configs (hub data, GPUs); only --print_config/--dry_run of them run here",
    ),
    (r"accelerator[ =](gpu|cuda)\b", "a GPU"),
    (r"^(srun|sbatch|torchrun)\b", "a cluster launcher"),
]

NEEDS_SHARED = re.compile(r"\.\./shared|configs/\S*local\S*\.yaml")
# Commands that need an optional extra: the page is skipped (with the reason) where the extra's
# packages are not installed; the tox env `interop` installs them and runs those pages.
NEEDS_EXTRA = [
    (
        re.compile(r"\bmidtrain (export|generate|lm-eval)\b|\blm_eval\b|\btransformers\b"),
        ("transformers", "safetensors", "lm_eval"),
        "midtrain[eval]",
    ),
]


@dataclass
class Command:
    line: int  # 1-based line in the page
    text: str  # the command as a user types it (continuations joined)

    @property
    def slow(self) -> bool:
        return any(re.search(p, self.text) for p in SLOW)


@dataclass
class Block:
    line: int  # line of the opening fence
    lang: str
    body: list[str]


def blocks(page: Path) -> list[Block]:
    out, current = [], None
    for number, raw in enumerate(page.read_text().splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)", raw)
        if fence and current is None:
            current = Block(number, fence.group(1).lower(), [])
        elif fence and raw.strip() == "```":
            out.append(current)
            current = None
        elif current is not None:
            current.body.append(raw)
    return out


def _strip_comment(line: str) -> str:
    """Drop a `# comment` outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands(block: Block) -> list[Command]:
    out: list[Command] = []
    pending: tuple[int, str] | None = None
    for offset, raw in enumerate(block.body, 1):
        line = raw
        if block.lang == "console":
            if pending is None and not line.lstrip().startswith("$ "):
                continue
            line = line.lstrip()[2:] if pending is None else line
        start, text = pending if pending else (block.line + offset, "")
        if pending and _open_quote(pending[1]):  # inside a quoted multi-line argument: as is
            line = line.rstrip()
        else:
            line = _strip_comment(line) if not line.rstrip().endswith("\\") else line.rstrip()
        if line.endswith("\\"):
            pending = (start, text + line[:-1].strip() + " ")
            continue
        text = text + line if pending and _open_quote(pending[1]) else text + line.strip()
        if _open_quote(text):  # e.g. python -c "<several lines>": the newline is part of it
            pending = (start, text + "\n")
            continue
        pending = None
        text = text.strip()
        if text:
            out.append(Command(start, text))
    return out


def _open_quote(text: str) -> bool:
    """Whether ``text`` ends inside a quoted string (a command that goes on on the next line)."""
    try:
        shlex.split(text)
    except ValueError:
        return True
    return False


def files_written(block: Block) -> str | None:
    """A yaml block that names its file in its first line (`# shared.yaml`)."""
    if block.lang in ("yaml", "yml") and block.body:
        named = re.match(r"^#\s*([\w./-]+\.ya?ml)\s*$", block.body[0].strip())
        return named.group(1) if named else None
    return None


def page_steps(page: Path) -> list[tuple[str, Command | tuple[int, str, str]]]:
    """A page's executable steps in order: ("run", Command) or ("write", (line, file, text))."""
    steps: list = []
    for block in blocks(page):
        if block.lang in SHELL:
            steps += [("run", c) for c in commands(block)]
        elif (name := files_written(block)) is not None:
            steps.append(("write", (block.line, name, "\n".join(block.body) + "\n")))
    return steps


# -- one command line -> what bash runs ----------------------------------------------------------


def split_operators(text: str) -> list[tuple[str, str]]:
    """[(segment, operator after it)] for ;, &&, ||, | outside quotes."""
    parts, start, i, quote = [], 0, 0, None
    while i < len(text):
        ch = text[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif text.startswith(("&&", "||"), i):
            parts.append((text[start:i], text[i : i + 2]))
            start, i = i + 2, i + 2
            continue
        elif ch in ";|":
            parts.append((text[start:i], ch))
            start = i + 1
        i += 1
    parts.append((text[start:], ""))
    return parts


def _sets(words: list[str], key: str) -> bool:
    return any(w == f"--{key}" or w.startswith(f"--{key}=") for w in words)


def _extras() -> set[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project.get("optional-dependencies", {}))


def _tox() -> configparser.ConfigParser:
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    return tox


def check_pip(words: list[str]) -> None:
    """`pip install ...`: what it would install exists here (not run)."""
    assert words[1] == "install", f"only `pip install` is understood here: {words}"
    pins = dict(
        re.findall(r"^\s*(?:deps\s*=\s*)?([\w-]+)==([\w.+]+)\s*$", _tox()["testenv"]["deps"], re.M)
    )
    for word in words[2:]:
        if word.startswith("-"):
            continue
        local = re.match(r"^\.(?:\[([\w,\s-]+)\])?$", word)
        if local:
            wanted = {e.strip() for e in (local.group(1) or "").split(",") if e.strip()}
            assert wanted <= _extras(), f"extras {sorted(wanted - _extras())} not in pyproject.toml"
        elif "==" in word:
            name, version = word.split("==")
            if name in pins:
                assert version == pins[name], f"{word}: tox.ini tests {name}=={pins[name]}"


def check_tox(words: list[str]) -> None:
    """`tox [-e envs]`: the environments exist (not run: it runs this suite)."""
    tox = _tox()
    known = {"py", *[s.split(":", 1)[1] for s in tox.sections() if s.startswith("testenv:")]}
    if "-e" in words:
        envs = set(words[words.index("-e") + 1].split(","))
        assert envs <= known, f"tox environments {sorted(envs - known)} not in tox.ini"


def check_tensorboard(words: list[str], sandbox: Path) -> None:
    logdir = words[words.index("--logdir") + 1] if "--logdir" in words else None
    assert logdir, "tensorboard without --logdir"
    assert list((sandbox / logdir).rglob("events.out.tfevents.*")), (
        f"tensorboard --logdir {logdir}: no events file there after the page's earlier commands"
    )


def _segment(segment: str, sandbox: Path) -> str:
    """What bash runs for one segment: midtrain with overrides, checks for the rest."""
    words = shlex.split(segment)
    while words and re.match(r"^\w+=", words[0]):  # VAR=value prefixes
        words = words[1:]
    program = words[0] if words else ""
    if program == "midtrain" and len(words) > 1:
        extra = [
            f"--{k}={v}" for k, v in OVERRIDES.get(words[1], {}).items() if not _sets(words, k)
        ]
        return " ".join([segment.rstrip(), *map(shlex.quote, extra)])
    if program in ("pip", "pip3"):
        check_pip(words)
        return " true "
    if program == "tox":
        check_tox(words)
        return " true "
    if program == "tensorboard":
        check_tensorboard(words, sandbox)
        return " true "
    return segment


def to_bash(text: str, sandbox: Path) -> str:
    return "".join(_segment(seg, sandbox) + op for seg, op in split_operators(text))


# -- the checks ---------------------------------------------------------------------------------


def _id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_blocks_follow_the_rule(page: Path) -> None:
    """Every fence names its language; executed commands need neither the hub nor a GPU."""
    problems = [
        f"{_id(page)}:{b.line}: a bare ``` fence: write ```bash (run by the docs test) "
        f"or ```text (shown only)"
        for b in blocks(page)
        if not b.lang
    ]
    for kind, step in page_steps(page):
        if kind != "run":
            continue
        for pattern, what in NEEDS_HUB_OR_GPU:
            if re.search(pattern, step.text):
                problems.append(
                    f"{_id(page)}:{step.line}: `{step.text}` needs {what}: put it in "
                    f"a ```text block with a note (executed blocks must run on CPU, "
                    f"offline)"
                )
    assert not problems, "\n".join(problems)


def test_help_in_the_docs_is_the_real_one(capsys: pytest.CaptureFixture) -> None:
    """A ```text block showing `midtrain --help` is exactly what it prints (every command)."""
    from midtrain.cli import main

    main(["--help"])
    real = capsys.readouterr().out.strip()
    shown = [
        (page, b)
        for page in PAGES
        for b in blocks(page)
        if b.lang == "text" and b.body and b.body[0].startswith("usage: midtrain <command>")
    ]
    assert shown, "no page shows `midtrain --help` (install.md should)"
    for page, block in shown:
        assert "\n".join(block.body).strip() == real, (
            f"{_id(page)}:{block.line}: the `midtrain --help` shown differs from the real one:\n"
            f"{real}"
        )


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/demo, built once, as `midtrain prepare --config configs/prepare/demo.yaml` does."""
    sandbox = tmp_path_factory.mktemp("docs-demo-store")
    _link_repo(sandbox)
    _run(sandbox, "midtrain prepare --config configs/prepare/demo.yaml", timeout=900)
    return sandbox / "data" / "demo"


def _link_repo(sandbox: Path) -> None:
    for name in ("configs", "tests"):
        (sandbox / name).symlink_to(ROOT / name)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MIDTRAIN_TRACEBACK", None)
    return env


def _run(sandbox: Path, script: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script],
        cwd=sandbox,
        env=_env(),
        timeout=timeout,
        capture_output=True,
        text=True,
    )


def run_page(page: Path, tmp_path: Path, demo_store: Path, include_slow: bool) -> None:
    steps = page_steps(page)
    if not any(kind == "run" and (include_slow or not step.slow) for kind, step in steps):
        pytest.skip("no command of this kind on the page")
    mentions = " ".join(s.text if kind == "run" else s[2] for kind, s in steps)
    if NEEDS_SHARED.search(mentions) and not SHARED.is_dir():
        pytest.skip(f"the page reads the sample data, not found at {SHARED}")
    for pattern, modules, extra in NEEDS_EXTRA:
        if pattern.search(mentions):
            for module in modules:
                pytest.importorskip(module, reason=f"the page's commands need {extra}")
    sandbox = tmp_path / "repo"
    sandbox.mkdir()
    _link_repo(sandbox)
    if SHARED.is_dir():
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "data").symlink_to(SHARED)
    shutil.copytree(demo_store, sandbox / "data" / "demo")
    for kind, step in steps:
        if kind == "write":
            line, name, text = step
            (sandbox / name).parent.mkdir(parents=True, exist_ok=True)
            (sandbox / name).write_text(text)
            continue
        if step.slow and not include_slow:
            continue
        where = f"{_id(page)}:{step.line}: `{step.text}`"
        try:
            script = to_bash(step.text, sandbox)
        except AssertionError as e:
            pytest.fail(f"{where}: {e}")
        try:
            done = _run(sandbox, script, timeout=3600 if step.slow else 600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{where} timed out")
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
            pytest.fail(f"{where} exited {done.returncode} (ran: {script})\n{tail}")


def _has_slow(page: Path) -> bool:
    return _id(page) in SLOW_PAGES or any(
        kind == "run" and step.slow for kind, step in page_steps(page)
    )


@pytest.mark.parametrize("page", [p for p in PAGES if _id(p) not in SLOW_PAGES], ids=_id)
def test_page_commands(page: Path, tmp_path: Path, demo_store: Path) -> None:
    run_page(page, tmp_path, demo_store, include_slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if _has_slow(p)], ids=_id)
def test_page_commands_slow(page: Path, tmp_path: Path, demo_store: Path) -> None:
    run_page(page, tmp_path, demo_store, include_slow=True)


def test_slow_pages_only_repeat_other_pages() -> None:
    """A page kept out of the fast test has no command that the fast test does not run."""

    def texts(page: Path) -> set[str]:  # each command and each part of a compound one
        return {
            seg.strip()
            for kind, s in page_steps(page)
            if kind == "run" and not s.slow
            for seg, _ in split_operators(s.text)
        }

    fast = set().union(*(texts(p) for p in PAGES if _id(p) not in SLOW_PAGES))
    for page in PAGES:
        if _id(page) in SLOW_PAGES:
            assert texts(page) <= fast, (
                f"{_id(page)}: {sorted(texts(page) - fast)} run only in the slow test; run them "
                f"on another page too, or take {_id(page)} out of SLOW_PAGES"
            )


# -- the parser itself ---------------------------------------------------------------------------


def test_parser_reads_blocks_commands_and_operators(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        "x\n```bash\nmidtrain fit --config a.yaml \\\n    --trainer.max_steps 9  # c\n"
        "\n```\n```text\nmidtrain fit: error: shown only\n```\n```console\n"
        "$ midtrain --help\nusage: ...\n```\n```yaml\n# b.yaml\nk: 1\n```\n"
    )
    steps = page_steps(page)
    assert [(k, s.line, s.text) if k == "run" else (k, s[0], s[1]) for k, s in steps] == [
        ("run", 3, "midtrain fit --config a.yaml --trainer.max_steps 9"),
        ("run", 11, "midtrain --help"),
        ("write", 14, "b.yaml"),
    ]
    bash = to_bash(
        "python -c 'import a; b' 2>/dev/null || pip install -e '.[test]' && "
        "midtrain fit --trainer.max_steps 9",
        tmp_path,
    )
    assert bash.startswith("python -c 'import a; b' 2>/dev/null || true && midtrain fit")
    assert "--trainer.max_steps=4" not in bash and "--trainer.num_sanity_val_steps=0" in bash
    with pytest.raises(AssertionError, match="nope"):
        to_bash("pip install -e '.[nope]'", tmp_path)
    with pytest.raises(AssertionError, match="tox.ini tests torch"):
        to_bash("pip install torch==1.0", tmp_path)
