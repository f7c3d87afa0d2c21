"""The real `dvc repro` on tiny params in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pipeline_params import tiny_params

from nodeseg.params import dump_params

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A git repository holding the project's files (committed or not, minus ignored ones) and tiny params."""
    if shutil.which("dvc") is None or shutil.which("git") is None:
        pytest.skip("dvc and git must be on PATH")
    dest = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "params.yaml").write_text(dump_params(tiny_params()))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _sh(["git", "init", "-q"], dest, env)
    _sh(["git", "add", "-A"], dest, env)
    _sh(["git", "commit", "-qm", "copy"], dest, env)
    _sh(["dvc", "repro"], dest, env)
    return dest, env


def test_repro_produces_metrics_and_plots(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    metrics = json.loads((root / "outputs/evaluate/metrics.json").read_text())
    assert {"unet", "contour", "image"} <= set(metrics)
    shown = json.loads(_sh(["dvc", "metrics", "show", "--json"], root, env))
    flat = json.dumps(shown)
    assert "iou" in flat and "weighted_fbeta" in flat
    _sh(["dvc", "plots", "show", "-o", str(root / "plots_html")], root, env)
    assert (root / "plots_html" / "index.html").is_file()
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"generate", "preprocess", "pretrain", "select", "refine", "image_evolve",
                                   "evaluate"}


def test_a_changed_param_reruns_only_what_it_affects(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    # dvc.yaml: the default pipeline (the tolerance study in tuning/dvc.yaml has never run, on purpose)
    assert "up to date" in _sh(["dvc", "status", "dvc.yaml"], root, env).lower()
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    # the runtime keys (nodeseg.params.RUNTIME_KEYS) rerun nothing
    params["data"]["workers"] = 2
    for section in ("pretrain", "refine", "image_evolve"):
        params[section]["log_every"], params[section]["num_workers"] = 7, 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "up to date" in _sh(["dvc", "status", "dvc.yaml"], root, env).lower()
    params = yaml.safe_load(original)
    params["evaluate"]["figure_times"] = 4
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(_sh(["dvc", "status", "--json", "dvc.yaml"], root, env))
    assert set(status) == {"evaluate"}, status
    out = _sh(["dvc", "repro"], root, env)
    assert "Running stage 'evaluate'" in out
    for stage in ("pretrain", "refine", "image_evolve", "preprocess"):
        assert f"Running stage '{stage}'" not in out


def test_dvc_exp_run_with_set_param(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    _sh(["git", "add", "-A"], root, env)
    _sh(["git", "commit", "-qm", "after repro"], root, env)
    out = _sh(["dvc", "exp", "run", "-S", "evaluate.figure_samples=1"], root, env)
    assert "Running stage 'evaluate'" in out and "Running stage 'pretrain'" not in out
    shown = _sh(["dvc", "exp", "show", "--json"], root, env)
    assert "figure_samples" in shown
