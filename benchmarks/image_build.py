"""Build the CPU image with no registry and no index inside the build, then run it as its non-root user.

    python -m benchmarks.image_build [--out DIR] [--work DIR] [--fresh] [--clean] [--mirror URL]

Needs root, ``buildah`` and ``debootstrap`` (``apt-get install -y buildah debootstrap``); without them it
stops at once with one line and exit status 1. Not in ``python -m benchmarks``'s default list for that
reason; CI does not run it (docs/kubernetes.md, "Building the images without a registry").

Steps, each timed (seconds of wall clock, under ``nice -n 15``):

1. ``base``: a Debian bookworm minbase with python3 (3.11), python3-venv and python-is-python3 (so that
   ``python`` is on PATH, as in python:3.11-slim), made by ``debootstrap`` from Debian's packages, apt lists
   and caches removed, and imported as the local image ``localhost/nodeseg-base:bookworm-python3.11``
   (``buildah from scratch`` + copy + commit). Cached: an existing image is reused unless ``--fresh``.
2. ``wheels``: ``pip wheel --wheel-dir wheels`` for the requirements the Dockerfile derives from
   pyproject.toml (dependencies + the kube extra) and the build backend (setuptools), into ``wheels/`` in
   the build context (the repository root; .gitignore'd, let in by .dockerignore). Cached while the
   requirements are unchanged. The torch wheel must be the CPU build (``+cpu``, no nvidia-* wheels).
3. ``build``: ``buildah bud --isolation chroot --pull-never`` of components/Dockerfile.cpu with
   ``--build-arg PYTHON_IMAGE=<the local base> --build-arg WHEELS=wheels``: every pip install inside runs
   ``--no-index --find-links /wheels``.
4. ``archive``: ``buildah push --compression-format gzip`` to an OCI archive, what would travel to an
   air-gapped registry (its size; the file is removed; ``--no-archive`` skips it).
5. runs in one container (``buildah from``, then ``buildah run --isolation chroot --user <the image's
   USER>``), with a host folder owned by that user mounted at /data as the working directory:
   ``id -u`` (not root), ``nodeseg --help``, the image's python/torch versions, ``nodeseg generate`` +
   ``nodeseg preprocess`` on a tiny phantom into /data, and every kfp step's command line from the compiled
   pipelines/*.yaml parsed by the image's own parsers (benchmarks/_image_argv.py, mounted read-only).

Writes ``<out>/image_build.json`` (seconds per step, image, base and archive sizes, wheel count and size,
the runs' results) and prints a table. ``--work`` (default /var/tmp/nodeseg-image-build) holds the rootfs, buildah's
storage (vfs, its own --root, apart from the system's) and the logs; ``--clean`` removes the images after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common

DOCKERFILE = common.REPO / "components" / "Dockerfile.cpu"
WHEELS = common.REPO / "wheels"  # the build context is the repository root
BASE_TAG = "localhost/nodeseg-base:bookworm-python3.11"
IMAGE_TAG = "localhost/nodeseg:0.1.0-cpu"
CONTAINER = "nodeseg-image-check"
DEBIAN_PACKAGES = ("python3", "python3-venv", "python-is-python3")
TINY = ("phantom.n_cases=4", "phantom.n_slices=8", "phantom.shape=[48,48]", "data.workers=1", "ingest.size=32")
PIPELINES = ("training", "tuning")


class StepFailed(RuntimeError):
    pass


def requirements() -> str:
    """What the Dockerfile installs (its own one-liner's list) plus the build backend of `pip install .`."""
    import tomllib

    project = tomllib.loads((common.REPO / "pyproject.toml").read_text())["project"]
    backend = tomllib.loads((common.REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    return "\n".join([*project["dependencies"], *project["optional-dependencies"]["kube"], *backend]) + "\n"


class Builder:
    """buildah on its own vfs storage under ``work``; every command logged, niced, timed."""

    def __init__(self, work: Path, nice: int) -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.nice = ["nice", "-n", str(nice)] if nice else []
        self.buildah = ["buildah", "--root", str(work / "storage"), "--runroot", str(work / "runroot"),
                        "--storage-driver", "vfs"]

    def sh(self, name: str, argv: list[str], *, check: bool = True, timeout: float = 3600
           ) -> subprocess.CompletedProcess[str]:
        log = self.logs / f"{name}.log"
        proc = subprocess.run([*self.nice, *argv], capture_output=True, text=True, timeout=timeout)
        log.write_text(f"$ {' '.join(argv)}\n--- rc {proc.returncode}\n--- stdout\n{proc.stdout}\n"
                       f"--- stderr\n{proc.stderr}")
        if check and proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip() or "?").splitlines()[-1]
            raise StepFailed(f"{name} failed (exit {proc.returncode}): {last[:300]} (log: {log})")
        return proc

    def bah(self, name: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.sh(name, [*self.buildah, *args], **kw)

    def exists(self, tag: str) -> bool:
        return self.bah("exists", "inspect", "--type", "image", tag, check=False).returncode == 0

    def size(self, tag: str) -> dict[str, Any]:
        """Bytes of the image's layers (uncompressed tars, as stored) and buildah's own figure."""
        manifest = json.loads(self.bah("manifest", "inspect", "--type", "image", "--format", "{{.Manifest}}",
                                       tag).stdout)
        shown = self.bah("size", "images", "--format", "{{.Size}}", tag).stdout.strip()
        return {"bytes": sum(int(layer["size"]) for layer in manifest["layers"]),
                "layers": len(manifest["layers"]), "buildah_images": shown}


def make_base(b: Builder, mirror: str) -> dict[str, Any]:
    rootfs = b.work / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    t0 = time.perf_counter()
    b.sh("debootstrap", ["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
                         "bookworm", str(rootfs), mirror])
    for junk in ("var/lib/apt/lists", "var/cache/apt"):
        for p in (rootfs / junk).glob("*"):
            if p.is_file():
                p.unlink()
            elif p.is_dir() and p.name != "partial":
                shutil.rmtree(p)
    debootstrap_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ctr = b.bah("from-scratch", "from", "scratch").stdout.strip()
    mnt = b.bah("mount", "mount", ctr).stdout.strip()
    # tar preserves owners, modes, links and device nodes exactly (numeric ids: the rootfs's own)
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", "-", "."], stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "--numeric-owner", "-C", mnt, "-xf", "-"], stdin=tar.stdout, capture_output=True)
    tar.wait()
    if tar.returncode or untar.returncode:
        raise StepFailed(f"base: copying the rootfs failed: {untar.stderr.decode()[-300:]}")
    b.bah("umount", "umount", ctr)
    b.bah("config", "config", "--os", "linux", "--arch", "amd64", "--cmd", "/bin/bash",
          "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "--env", "LANG=C.UTF-8",
          "--label", f"org.opencontainers.image.description=Debian bookworm minbase + {' '.join(DEBIAN_PACKAGES)}"
          " (debootstrap)", ctr)
    b.bah("commit", "commit", "--rm", ctr, BASE_TAG)
    shutil.rmtree(rootfs)
    return {"debootstrap_s": debootstrap_s, "import_s": time.perf_counter() - t0}


def fetch_wheels(b: Builder, fresh: bool) -> dict[str, Any]:
    reqs = requirements()
    stamp = WHEELS / ".requirements.txt"
    cached = not fresh and stamp.is_file() and stamp.read_text() == reqs
    t0 = time.perf_counter()
    if not cached:
        if WHEELS.exists():
            shutil.rmtree(WHEELS)
        tmp = b.work / "requirements.txt"
        tmp.write_text(reqs)
        b.sh("wheels", [sys.executable, "-m", "pip", "wheel", "--wheel-dir", str(WHEELS), "-r", str(tmp)])
        stamp.write_text(reqs)
    seconds = time.perf_counter() - t0
    names = sorted(p.name for p in WHEELS.glob("*.whl"))
    torch = [n for n in names if n.startswith("torch-")]
    nvidia = [n for n in names if n.startswith("nvidia_")]
    if len(torch) != 1 or "+cpu" not in torch[0] or nvidia:
        raise StepFailed(f"wheels: expected one CPU torch wheel (+cpu) and no nvidia-* wheels in {WHEELS}, got "
                         f"{torch} and {len(nvidia)} nvidia wheels: fetch torch from the CPU index first "
                         "(pip download --no-deps torch==<pin> --index-url https://download.pytorch.org/whl/cpu "
                         f"-d {WHEELS}) and rerun")
    return {"seconds": seconds, "cached": cached, "count": len(names), "torch": torch[0],
            "bytes": sum((WHEELS / n).stat().st_size for n in names),
            "requirements_sha256": hashlib.sha256(reqs.encode()).hexdigest()[:16]}


def kfp_argvs() -> list[dict[str, Any]]:
    """Every container step of the compiled pipelines, placeholders filled as KFP would fill them."""
    import re

    import yaml

    placeholder = re.compile(r"\{\{\$\.(inputs|outputs)\.(parameters|artifacts)\['([^']+)'\]\.?(\w*)\}\}")
    samples = {"namespace": "nodeseg", "job_delete": "on-success", "job_timeout_s": "3600", "ddp_workers": "2",
               "storage": "sqlite:///study.db"}

    def value(m: re.Match[str]) -> str:
        _, kind, name, attr = m.groups()
        if kind == "artifacts":
            return f"/minio/mlpipeline/v2/artifacts/run/{name}"
        return f"/tmp/outputs/{name}" if attr == "output_file" else samples.get(name, "1")

    steps = []
    for name in PIPELINES:
        spec = next(yaml.safe_load_all((common.REPO / "pipelines" / f"{name}.yaml").read_text()))
        for ex, v in spec["deploymentSpec"]["executors"].items():
            if "container" in v:
                c = v["container"]
                steps.append({"executor": f"{name}/{ex}", "command": c["command"],
                              "args": [placeholder.sub(value, a) for a in c.get("args", [])]})
    return steps


def run_checks(b: Builder, user: str) -> dict[str, Any]:
    data = b.work / "data"
    check = b.work / "check"
    for d in (data, check):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
    uid, _, gid = user.partition(":")
    os.chown(data, int(uid), int(gid or uid))
    shutil.copy(common.REPO / "benchmarks" / "_image_argv.py", check / "_image_argv.py")
    steps = kfp_argvs()
    (check / "argv.json").write_text(json.dumps(steps))
    b.bah("rm-old", "rm", CONTAINER, check=False)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    b.bah("from", "from", "--pull-never", "--name", CONTAINER, IMAGE_TAG)
    out["container_s"] = time.perf_counter() - t0

    def run(name: str, *cmd: str) -> tuple[float, str]:
        t = time.perf_counter()
        proc = b.bah(f"run-{name}", "run", "--isolation", "chroot", "--user", user, "--workingdir", "/data",
                     "--volume", f"{data}:/data", "--volume", f"{check}:/check:ro", CONTAINER, "--", *cmd)
        return time.perf_counter() - t, proc.stdout

    runs: dict[str, Any] = {}
    try:
        s, o = run("id", "id", "-u")
        runs["id"] = {"seconds": s, "uid": int(o.strip())}
        if runs["id"]["uid"] == 0:
            raise StepFailed("run: the image's user is root")
        s, o = run("help", "nodeseg", "--help")
        runs["help"] = {"seconds": s, "first_line": o.strip().splitlines()[0]}
        s, o = run("versions", "python", "-c", "import json, platform, torch; print(json.dumps({'python': "
                   "platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda}))")
        runs["versions"] = {"seconds": s, **json.loads(o.strip().splitlines()[-1])}
        sets = [a for kv in TINY for a in ("--set", kv)]
        s, _ = run("generate", "nodeseg", "generate", "--params", "/dev/null", *sets, "--out", "/data/raw")
        cases = sorted(p.name for p in (data / "raw").glob("case_*"))
        runs["generate"] = {"seconds": s, "cases": len(cases)}
        s, _ = run("preprocess", "nodeseg", "preprocess", "--params", "/dev/null", *sets, "--raw", "/data/raw",
                   "--out", "/data/shards")
        shards = sorted(p.relative_to(data / "shards").as_posix() for p in (data / "shards").rglob("*.parquet"))
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in (data / "shards").rglob("*")}
        runs["preprocess"] = {"seconds": s, "shards": shards,
                              "owned_by": sorted(f"{u}:{g}" for u, g in owners)}
        if not cases or not shards or owners != {(int(uid), int(gid or uid))}:
            raise StepFailed(f"run: generate/preprocess wrote {len(cases)} cases, {shards} owned by {owners}")
        s, o = run("kfp-argv", "python", "/check/_image_argv.py", "/check/argv.json")
        runs["kfp_argv"] = {"seconds": s, **json.loads(o.strip().splitlines()[-1])}
    finally:
        b.bah("rm", "rm", CONTAINER, check=False)
    out["runs"] = runs
    return out


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return str(n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=common.RESULTS, help="folder for image_build.json")
    p.add_argument("--work", type=Path, default=Path("/var/tmp/nodeseg-image-build"),
                   help="rootfs, buildah storage and logs (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="remake the base and the wheels (cold timings)")
    p.add_argument("--clean", action="store_true", help="remove the images (and their storage) afterwards")
    p.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror for debootstrap")
    p.add_argument("--no-archive", dest="archive", action="store_false",
                   help="skip writing the image as a gzip OCI archive (its compressed size)")
    p.add_argument("--nice", type=int, default=15, help="niceness of every command (0: none)")
    args = p.parse_args(argv)
    for tool in ("buildah", "debootstrap"):
        if not shutil.which(tool):
            print(f"image_build: {tool} not found on PATH: apt-get install -y buildah debootstrap", file=sys.stderr)
            return 1
    if os.geteuid() != 0:
        print("image_build: needs root (debootstrap, and buildah's chroot isolation with vfs storage)",
              file=sys.stderr)
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    b = Builder(args.work.resolve(), args.nice)
    result: dict[str, Any] = {"dockerfile": "components/Dockerfile.cpu", "image": IMAGE_TAG, "base": BASE_TAG,
                              "storage_driver": "vfs", "isolation": "chroot", "buildah": "", "steps": {},
                              "load_average_before": common.load_average()}
    steps = result["steps"]
    try:
        result["buildah"] = b.sh("version", ["buildah", "--version"]).stdout.strip()
        if args.fresh:
            for tag in (IMAGE_TAG, BASE_TAG):
                b.bah("rmi", "rmi", "-f", tag, check=False)
        t0 = time.perf_counter()
        if not b.exists(BASE_TAG):
            steps["base"] = {**make_base(b, args.mirror), "cached": False}
        else:
            steps["base"] = {"cached": True}
        steps["base"]["seconds"] = time.perf_counter() - t0
        steps["wheels"] = fetch_wheels(b, args.fresh)
        t0 = time.perf_counter()
        b.bah("build", "bud", "--isolation", "chroot", "--pull-never", "-f", str(DOCKERFILE),
              "--build-arg", f"PYTHON_IMAGE={BASE_TAG}", "--build-arg", "WHEELS=wheels", "-t", IMAGE_TAG,
              str(common.REPO))
        steps["build"] = {"seconds": time.perf_counter() - t0}
        user = b.bah("inspect", "inspect", "--type", "image", "--format", "{{.OCIv1.Config.User}}",
                     IMAGE_TAG).stdout.strip()
        result["user"] = user
        result["image_size"] = b.size(IMAGE_TAG)
        result["base_size"] = b.size(BASE_TAG)
        if args.archive:
            # what travels to an air-gapped registry: an OCI archive, layers gzip-compressed
            archive = b.work / "nodeseg-cpu.oci.tar"
            archive.unlink(missing_ok=True)
            t0 = time.perf_counter()
            b.bah("archive", "push", "--compression-format", "gzip", IMAGE_TAG, f"oci-archive:{archive}")
            steps["archive"] = {"seconds": time.perf_counter() - t0, "bytes": archive.stat().st_size}
            result["archive_bytes"] = archive.stat().st_size
            archive.unlink()
        checks = run_checks(b, user)
        steps["container"] = {"seconds": checks["container_s"]}
        steps.update({f"run:{k}": v for k, v in checks["runs"].items()})
        if checks["runs"]["kfp_argv"]["failed"]:
            raise StepFailed(f"kfp-argv: {checks['runs']['kfp_argv']['failed'][:3]}")
    except StepFailed as err:
        print(f"image_build: {err}", file=sys.stderr)
        return 1
    finally:
        if args.clean:
            for tag in (IMAGE_TAG, BASE_TAG):
                b.bah("rmi", "rmi", "-f", tag, check=False)
    result["total_s"] = sum(v["seconds"] for v in steps.values())
    rows = [{"step": k, "seconds": round(v["seconds"], 1),
             "note": ", ".join(f"{kk}={vv}" for kk, vv in v.items() if kk != "seconds")[:90]}
            for k, v in steps.items()]
    for key in ("image_size", "base_size"):
        rows.append({"step": key.replace("_", " "), "seconds": "",
                     "note": f"{human(result[key]['bytes'])} ({result[key]['layers']} layers, uncompressed)"})
    if "archive_bytes" in result:
        rows.append({"step": "archive size", "seconds": "", "note": f"{human(result['archive_bytes'])} (gzip)"})
    print(common.table(rows, ["step", "seconds", "note"]))
    import torch

    path = common.write_result(args.out, "image_build", result, torch.device("cpu"), argparse.Namespace(quick=False))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
