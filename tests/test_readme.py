"""Every snippet in README.md, executed (issue 8, item 12): the Python API block as written,
each `esm-index` command through CliRunner, the shown output against a real run, and the
command-line synopsis against each command's --help. Commands that install or build for
minutes (install.sh, .ci/run, tools/*.py) are checked to exist and compile; CI runs them.
A block of a kind this file does not handle fails the suite, so new snippets get covered."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import py_compile
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO
from esm_index.cli import main

README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.M | re.S)
HANDLED = {"bash", "python", "text", "console"}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One embedding cache for this module's tests: the README ranks the same samples often."""
    return tmp_path_factory.mktemp("readme-cache")


@pytest.fixture
def scratch(tmp_path, monkeypatch, shared_cache) -> Path:
    """A scratch working folder that sees the checkout's indexes/ (as a fresh clone would),
    with HOME moved there too."""
    import esm_index.index as index_module

    (tmp_path / "indexes").symlink_to(REPO / "indexes")
    (tmp_path / "tools").symlink_to(REPO / "tools")
    (tmp_path / ".ci").symlink_to(REPO / ".ci")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ESM_INDEX_DEFAULT", raising=False)
    monkeypatch.setattr(index_module, "CACHE_DIR", shared_cache)
    return tmp_path


def _blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCKS if lang == kind]


def _commands(block: str) -> list[str]:
    """The shell commands of a bash block: comments dropped, `&&` chains split."""
    out = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out += [part.strip() for part in line.split("&&")]
    return out


def _esm_index(runner, command: str):
    """Run one `esm-index ...` (or `.venv/bin/esm-index ...`) command line through CliRunner,
    with `~` and globs expanded as a shell would."""
    words = shlex.split(command)
    assert Path(words[0]).name == "esm-index", command
    args = []
    for word in words[1:]:
        word = os.path.expanduser(word)
        args += sorted(glob.glob(word)) if any(c in word for c in "*?[") else [word]
    return runner.invoke(main, args)


def test_every_block_is_of_a_kind_this_file_runs():
    assert BLOCKS and {lang for lang, _ in BLOCKS} <= HANDLED, {lang for lang, _ in BLOCKS}
    assert len(_blocks("python")) == 1 and len(_blocks("console")) == 1
    assert [b.startswith("esm-index ") for b in _blocks("text")].count(True) == 1  # the synopsis


def test_the_pipeline_picture_names_real_modules():
    (picture,) = [b for b in _blocks("text") if not b.startswith("esm-index ")]
    names = re.findall(r"(\w+)\.py", picture) + re.findall(r"(\w+)\.\w+Stats", picture)
    assert len(names) >= 4
    for name in names:
        assert (REPO / "esm_index" / f"{name}.py").is_file(), name


def test_the_python_api_block_runs_as_written(scratch):
    code = _blocks("python")[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("1 en_bbc_news_topic ") and len(lines) == 6
    assert "'examples': 300" in lines[5]
    from esm_index.index import SourceIndex

    with SourceIndex(scratch / "my_pool", readonly=True) as pool:
        assert sorted(s["name"] for s in pool.sources()) == ["en_bbc_news_topic", "en_sms_spam"]


def test_the_shown_output_is_what_the_command_prints(scratch, runner, monkeypatch, tmp_path):
    import esm_index.index as index_module

    monkeypatch.setattr(index_module, "CACHE_DIR", tmp_path / "cold")  # a first query: the model loads
    block = _blocks("console")[0].splitlines()
    command, shown = block[0].removeprefix("$ "), block[1:]
    result = _esm_index(runner, command)
    assert result.exit_code == 0, result.output
    printed = result.stdout.splitlines()
    header = next(line for line in shown if "target examples" in line)
    assert re.sub(r"[\d.]+ s$", "", printed[0]) == re.sub(r"[\d.]+ s$", "", header)
    table = shown[shown.index(header) + 1:]
    assert printed[1:] == table  # every rank, score and source as shown
    for line in shown[:shown.index(header)]:  # the stderr lines, in order
        prefix = line.split(" from ")[0]
        assert prefix in result.stderr, line


def test_every_bash_command_runs_or_is_checked(scratch, runner):
    """`esm-index` commands run; install/CI scripts and tools must exist (and compile)."""
    from esm_index.index import SourceIndex

    pool_dir = scratch / "home" / ".cache" / "esm-index" / "pool"
    with SourceIndex(REPO / "indexes" / "default", readonly=True) as default:  # stands in for build_pool's output
        default.export(pool_dir)
    ran = 0
    for block in _blocks("bash"):
        for command in _commands(block):
            words = shlex.split(command)
            if words[0] == "bash":
                script = REPO / words[1]
                assert script.is_file(), command
                if len(words) > 2:  # an extra of the package
                    assert f"\n{words[2]} = [" in (REPO / "pyproject.toml").read_text(), command
            elif Path(words[0]).name == "python":
                py_compile.compile(str(REPO / words[1]), doraise=True)
            else:
                result = _esm_index(runner, command)
                assert result.exit_code == 0, (command, result.output)
                ran += 1
    assert ran >= 3
    with SourceIndex(scratch / "my_pool", readonly=True) as pool:
        assert len(pool) == 26
    ci = (REPO / ".ci" / "run").read_text()
    assert "tools/install.sh test" in ci and "pytest" in ci and ".ci/wheel_install" in ci


def test_the_synopsis_names_only_real_commands_and_options(runner):
    (synopsis,) = [b.replace("\\\n", " ") for b in _blocks("text") if b.startswith("esm-index ")]
    checked = 0
    for line in synopsis.splitlines():
        line = re.sub(r"\s+#.*$", "", line)
        for part in re.split(r" \| (?=[a-z])", line):  # "info ... | list ...", not "[--json | --csv]"
            words = part.replace("esm-index ", "", 1).split()
            command = words[0]
            help_text = runner.invoke(main, [command, "--help"]).output
            assert "Usage:" in help_text, command
            for option in re.findall(r"--[a-z][a-z-]*(?:/--[a-z-]+)?", part):
                for name in option.split("/"):
                    assert name in help_text, (command, name)
                    checked += 1
    assert checked > 25
