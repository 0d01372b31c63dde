"""The docs cannot rot: the site builds strictly, the getting-started page runs, named files exist.

docs/getting-started.md's `bash` blocks run in order, as one script, in a copy of the checkout. A
command that would take long is shortened by a line before its block:

    <!-- test: TEXT => SHORTER -->

which makes the test run the block with every TEXT replaced by SHORTER (a marker whose TEXT is not
in its block fails the test: it went stale).
"""

import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GETTING_STARTED = REPO / "docs" / "getting-started.md"
MARKER = re.compile(r"^<!-- test: (.+?) => (.*) -->$")
FENCE = re.compile(r"^```(\w*)$")

# A repository path as docs and comments write it: a top-level folder, then a path. Placeholders
# (`conf/algorithm/<name>.yaml`) stop at the `<` and check the folder before it.
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:fdfa|conf|tests|scripts|sweeps|hydra_plugins|docs|\.ci)/[\w./-]*)"
)
# Paths that name something other than this checkout's files: the installed package's layout.
NOT_IN_CHECKOUT = {"fdfa/conf", "fdfa/sweeps"}


def page_script(page: Path) -> str:
    """The page's bash blocks, each shortened as its markers say, as one script."""
    lines, markers, script, block = page.read_text().splitlines(), [], [], None
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if block is None and (marker := MARKER.match(line)):
            markers.append((number, marker[1], marker[2]))
        elif block is None and fence and fence[1] == "bash":
            block = []
        elif block is not None and fence:
            text = "\n".join(block)
            for at, old, new in markers:
                assert old in text, f"{page.name}:{at}: marker text {old!r} not in the next block"
                text = text.replace(old, new)
            script.append(text)
            markers, block = [], None
        elif block is not None:
            block.append(line)
        elif fence:  # a block of another language: its markers would be lost
            assert not markers, f"{page.name}:{number}: markers before a non-bash block"
    assert not markers, f"{page.name}: markers after the last bash block"
    return "\n".join(script) + "\n"


def checkout_files() -> list[str]:
    """The checkout's files as a fresh clone has them (tracked, plus new files not ignored)."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [name for name in listing.split("\0") if name and (REPO / name).is_file()]


def test_site_builds_strictly(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict"]  # --quiet would hide the warnings
        + ["--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert (tmp_path / "site" / "getting-started" / "index.html").exists()
    assert (tmp_path / "site" / "mnist_fc2_acc.png").exists()  # the figures come along


def test_markers_shorten_the_commands():
    script = page_script(GETTING_STARTED)
    runs = [line for line in script.splitlines() if line.startswith("python run.py")]
    assert runs, "no python run.py command on the getting-started page"
    for run in runs:  # no command downloads data or runs 100 epochs in the test
        assert "dataset=fake" in run or "trainer.resume" in run, run
    assert "<time>" not in script


@pytest.mark.slow  # installs fdfa into a venv and runs about ten short jobs: minutes
def test_getting_started_commands_run(tmp_path):
    copy = tmp_path / "checkout"
    for name in checkout_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, copy / name)
    script = copy / "getting_started.sh"
    script.write_text("set -euxo pipefail\n" + page_script(GETTING_STARTED))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",  # `python` is this one
        FDFA_DATA_DIR=str(tmp_path / "data"),  # nothing is read from or written to a shared dir
        MPLBACKEND="Agg",
        WANDB_MODE="offline",
        PIP_NO_INPUT="1",
    )
    run = subprocess.run(
        ["bash", str(script)], cwd=copy, env=env, capture_output=True, text=True, timeout=1500
    )
    assert run.returncode == 0, f"{run.stderr[-6000:]}\n{run.stdout[-2000:]}"
    assert (copy / ".venv" / "bin" / "python").exists()  # the set-up block made the venv
    assert sorted((copy / "outputs").glob("fdfa-fc-fake/*/summary.json"))  # the main job ran
    assert (copy / "report" / "first" / "results.md").exists()  # and the report


def named_paths(text: str) -> set[str]:
    """The repository paths a text names, trailing punctuation and `::test` parts removed."""
    return {match.rstrip(".") for match in REPO_PATH.findall(text)}


def python_comments(source: str) -> str:
    """A module's comments and docstrings, not its code or other strings."""
    parts = [
        t.string
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            parts.append(ast.get_docstring(node) or "")
    return "\n".join(parts)


def hash_comments(source: str) -> str:
    """The `#` comments of a shell, YAML or TOML file."""
    return "\n".join(line.split("#", 1)[1] for line in source.splitlines() if "#" in line)


def documents() -> dict[str, str]:
    """Every text that names files: the docs whole, the code by its comments."""
    texts = {}
    for name in checkout_files():
        path = REPO / name
        if name.endswith(".md"):
            texts[name] = path.read_text()
        elif name.endswith(".py"):
            texts[name] = python_comments(path.read_text())
        elif name.endswith((".sh", ".yaml", ".toml")) or name in (".ci/run", ".gitignore"):
            texts[name] = hash_comments(path.read_text())
    return texts


def missing_references(texts: dict[str, str]) -> list[str]:
    return sorted(
        f"{name}: {path}"
        for name, text in texts.items()
        for path in named_paths(text)
        if path.rstrip("/") not in NOT_IN_CHECKOUT and not (REPO / path).exists()
    )


def test_docs_and_comments_name_only_existing_files():
    texts = documents()
    assert {"README.md", "CONTRIBUTING.md", "docs/getting-started.md", "fdfa/train.py"} <= set(
        texts
    )
    assert missing_references(texts) == []


def test_a_missing_file_is_reported():
    texts = {"README.md": "see `fdfa/run.py` and conf/model/fc.yaml", "x.py": "# tests/nope/"}
    assert missing_references(texts) == ["README.md: fdfa/run.py", "x.py: tests/nope/"]
    assert named_paths("`conf/algorithm/<name>.yaml`, tests/test_cli.py::test_x.") == {
        "conf/algorithm/",
        "tests/test_cli.py",
    }
