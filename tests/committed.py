"""The committed params.yaml, which the tests read instead of the working copy.

A user's experiment rewrites the working params.yaml (``dvc exp run -S refine.lr=5e-4`` changes the value and
re-serialises flow lists as block lists), so a test that read it would fail, or pass, by what the user last
tried. Tests read :data:`PARAMS` instead: the file as git has it (the index, which is HEAD's file unless a
change is staged), written once per process to a temporary file; outside a git checkout (an sdist, a copied
tree) the working file itself. The conftest points the pipelines' defaults (``NODESEG_PIPELINE_DEFAULTS``,
read by :mod:`components.params`) at the same file, so a compiled pipeline is compared with the committed
params: a stale committed YAML still fails, a user's experiment does not.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKING = REPO / "params.yaml"


def committed_text(repo: Path = REPO) -> str:
    """params.yaml as git has it in ``repo`` (``git show :params.yaml``), else the working file's text."""
    try:
        done = subprocess.run(["git", "-C", str(repo), "show", ":params.yaml"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return (repo / "params.yaml").read_text()
    return done.stdout if done.returncode == 0 and done.stdout.strip() else (repo / "params.yaml").read_text()


def _write() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="nodeseg-committed-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "params.yaml"
    path.write_text(committed_text())
    return path


#: a file holding the committed params.yaml (named params.yaml, as messages that quote it show)
PARAMS = _write()
