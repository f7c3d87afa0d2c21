"""Time the README's default `dvc repro` from a clean copy of the repository and report its Table 1.

    python benchmarks/pipeline_default.py [--keep DIR] [--threads N]

Copies the project's files (committed or not, minus ignored ones) into a fresh git repository, runs each
stage of dvc.yaml in order with `dvc repro --single-item <stage>` (the same commands `dvc repro` runs), times
each, and writes benchmarks/results/pipeline_default.json plus a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def copy_repo(dest: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored) into ``dest``, committed."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "benchmark copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the stages")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="nodeseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    copy_repo(work)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    stages = list(yaml.safe_load((work / "dvc.yaml").read_text())["stages"])
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for stage in stages:
        t0 = time.perf_counter()
        proc = subprocess.run(["dvc", "repro", "--single-item", stage], cwd=work, env=env, capture_output=True,
                              text=True)
        timings[stage] = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        print(f"{stage:>14}: {timings[stage]:7.1f} s", flush=True)
    total = time.perf_counter() - t_all
    metrics = json.loads((work / "outputs" / "evaluate" / "metrics.json").read_text())
    registry = json.loads((work / "outputs" / "evaluate" / "registry.json").read_text())
    result = {
        "total_seconds": total,
        "stage_seconds": timings,
        "metrics": {k: metrics[k] for k in ("unet", "contour", "image") if k in metrics},
        "n_val": metrics.get("n_val"),
        "champion": registry,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "omp_num_threads": env.get("OMP_NUM_THREADS", "unset"),
                    "malloc": env.get("NODESEG_MALLOC") or "reuse"},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline_default.json").write_text(json.dumps(result, indent=2))
    print(f"\ntotal: {total / 60:.1f} min on {os.cpu_count()} CPUs\n")
    print((work / "outputs" / "evaluate" / "table.md").read_text())
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
