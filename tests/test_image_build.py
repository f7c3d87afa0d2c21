"""benchmarks/image_build.py: the CPU image built from a local base and local wheels, then run as its user.

The build itself needs root, buildah and debootstrap, and takes minutes: it runs only where buildah is
installed and ``NODESEG_IMAGE_TEST=1`` is set (CI does neither: docs/kubernetes.md says why). What runs
everywhere: the script refuses in one line without its tools, and the in-image command-line check accepts
every compiled kfp step here, with the host's parsers, and rejects a broken one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import _image_argv
from benchmarks.image_build import kfp_argvs

REPO = Path(__file__).resolve().parents[1]


def test_without_buildah_it_fails_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.image_build", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "image_build: buildah not found on PATH: apt-get install -y buildah debootstrap"]
    assert not (tmp_path / "image_build.json").exists()


def _write(tmp_path: Path, steps: list[dict]) -> Path:
    path = tmp_path / "argv.json"
    path.write_text(json.dumps(steps))
    return path


def test_every_kfp_step_is_checked_and_parses_here(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    steps = kfp_argvs()
    commands = {tuple(s["command"][:2]) for s in steps}
    assert ("python", "-m") in commands and any(c[0] == "nodeseg" for c in commands)
    assert len(steps) >= 10 and not any("{{$" in a for s in steps for a in s["args"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_image_argv.shutil, "which", lambda name: f"/usr/bin/{name}")
        assert _image_argv.main([str(_write(tmp_path, steps))]) == 0
    assert json.loads(capsys.readouterr().out) == {"parsed": len(steps), "failed": []}


def test_a_broken_step_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (step,) = [s for s in kfp_argvs() if s["command"][0] == "nodeseg"][:1]
    broken = [{**step, "args": [*step["args"], "--no-such-option"]},
              {**step, "executor": "gone", "command": ["no-such-program-here"]}]
    assert _image_argv.main([str(_write(tmp_path, broken))]) == 1
    failed = json.loads(capsys.readouterr().out)["failed"]
    assert [f["executor"] for f in failed] == [step["executor"], "gone"]
    assert "exit 2" in failed[0]["why"] and "not on PATH" in failed[1]["why"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not shutil.which("buildah") or os.environ.get("NODESEG_IMAGE_TEST") != "1",
                    reason="builds and runs the CPU image: needs root, buildah and debootstrap, and "
                           "NODESEG_IMAGE_TEST=1 (minutes; not in CI)")
def test_the_cpu_image_builds_from_local_parts_and_runs_as_its_user(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.image_build", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=3500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "image_build.json").read_text())
    steps = result["steps"]
    assert result["user"] == "10001:10001" and steps["run:id"]["uid"] == 10001
    assert steps["run:help"]["first_line"].startswith("usage: nodeseg")
    assert steps["run:versions"]["python"].startswith("3.11.") and steps["run:versions"]["cuda"] is None
    assert steps["run:versions"]["torch"].split("+")[0] == "2.13.0"
    assert steps["run:generate"]["cases"] == 4
    assert steps["run:preprocess"]["shards"] and steps["run:preprocess"]["owned_by"] == ["10001:10001"]
    assert steps["run:kfp_argv"]["failed"] == [] and steps["run:kfp_argv"]["parsed"] == len(kfp_argvs())
    assert result["image_size"]["bytes"] > result["base_size"]["bytes"] > 0
