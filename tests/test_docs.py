"""The documentation's commands: CI runs the README's test command (style check included), and every
``nodeseg ...`` command shown in README.md and docs/*.md parses with the CLI's parser."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from nodeseg.cli import build_parser

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the images and CI run Python 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_ci_runs_the_readmes_command_with_ruff_pinned() -> None:
    readme = (REPO / "README.md").read_text()
    command = next(line for block in _code_blocks(readme) for line in block.splitlines()
                   if "pip install -e \".[test]\"" in line)
    assert "ruff check ." in command and "python -m pytest" in command
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == command
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(re.fullmatch(r"ruff==[0-9][0-9.]*", spec.split(";")[0].strip()) for spec in extra), extra


def _documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every ``nodeseg ...`` command line in the code blocks of README.md and docs/*.md:
    continuation lines joined, comments dropped; an output line (``nodeseg <stage>: error: ...``) is not one."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in _code_blocks(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if len(words) >= 2 and words[0] == "nodeseg" and not words[1].endswith(":"):
                    found.append((path.name, line.strip()))
    return found


COMMANDS = _documented_commands()


def test_the_documented_commands_are_found() -> None:
    assert len(COMMANDS) >= 8
    assert ("storage.md", "nodeseg preprocess --raw data/raw/phantom --out s3://nodeseg-data/shards/v1") in COMMANDS


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_every_documented_command_parses(doc: str, command: str) -> None:
    """Parsed by ``nodeseg``'s own parser (shell variables stand for a number, e.g. ``--worker-index $I``)."""
    argv = shlex.split(re.sub(r"\$\{?\w+\}?", "1", command), comments=True)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"{doc}: `{command}` does not parse (exit {err.code})")
