"""The documentation's commands: CI runs the README's test command (style check included), and every
``nodeseg ...`` command shown in README.md and docs/*.md parses with the CLI's parser."""

from __future__ import annotations

import re
import sys
from pathlib import Path

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
