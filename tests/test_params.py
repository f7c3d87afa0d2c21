"""params.yaml: the committed file loads, overrides apply, unknown keys and wrong types are refused in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from committed import PARAMS, committed_text

from components.params import stage_sections
from nodeseg.config import flatten, from_mapping, to_mapping
from nodeseg.errors import ConfigError
from nodeseg.params import RUNTIME_KEYS, Params, dump_params, load_params, parse_override
from nodeseg.train.loop import RUNTIME_FIELDS, TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_load_and_round_trip(tmp_path: Path) -> None:
    params = load_params([PARAMS])
    assert params.contour.solver.rtol == 0.0
    assert params.select.samples == 8
    again = tmp_path / "again.yaml"
    again.write_text(dump_params(params))
    assert load_params([again]) == params


def test_every_dvc_params_key_exists() -> None:
    """Each params key dvc.yaml lists for a stage names a real section or field."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    known = set(flatten(to_mapping(Params())))
    for name, stage in stages.items():
        for key in stage.get("params", []):
            assert any(k == key or k.startswith(key + ".") for k in known), \
                f"dvc.yaml stage {name}: unknown params key {key!r}"


def _leaves_under(entries: list[str], known: set[str]) -> set[str]:
    return {k for k in known if any(k == e or k.startswith(e + ".") for e in entries)}


def test_dvc_lists_what_each_output_depends_on_not_the_runtime_keys() -> None:
    """dvc.yaml lists, per stage, every key of the sections it reads except RUNTIME_KEYS (data.workers,
    num_workers, log_every: a change reruns nothing); the same fields the training resume ignores."""
    assert {k.split(".")[-1] for k in RUNTIME_KEYS} - {"workers"} == set(RUNTIME_FIELDS)
    resumable = set(TrainConfig().resumable_view())
    assert not resumable & set(RUNTIME_FIELDS) and set(RUNTIME_FIELDS) <= {f.name for f in fields(TrainConfig)}
    known = set(flatten(to_mapping(Params())))
    for path in (REPO / "dvc.yaml", REPO / "tuning" / "dvc.yaml"):
        for name, stage in yaml.safe_load(path.read_text())["stages"].items():
            listed = _leaves_under(stage.get("params", []), known)
            assert not listed & set(RUNTIME_KEYS), f"{path.name} {name}: lists {sorted(listed & set(RUNTIME_KEYS))}"
            sections = {e.split(".")[0] for e in stage.get("params", [])}
            whole = _leaves_under(sorted(sections), known) - set(RUNTIME_KEYS)
            if path.parent == REPO:  # tuning/dvc.yaml leaves out the solver keys it writes (test_tune.py)
                assert listed == whole, f"dvc.yaml {name}: not listed: {sorted(whole - listed)}"


def test_every_params_key_is_read_by_a_stage() -> None:
    """Each key of params.yaml is among the keys some `nodeseg <stage>` reads (what its component is given);
    the runtime keys reach the stages of their sections too."""
    known = set(flatten(to_mapping(Params())))
    read = {stage: _leaves_under(list(entries), known) for stage, entries in stage_sections().items()}
    unread = known - set().union(*read.values())
    assert not unread, f"params keys no stage reads: {sorted(unread)}"
    assert {"data.workers"} <= read["preprocess"] and {"pretrain.log_every", "pretrain.num_workers"} <= read["pretrain"]


def test_overrides_and_later_files_win(tmp_path: Path) -> None:
    extra = tmp_path / "tuned.yaml"
    extra.write_text("contour:\n  solver:\n    atol: 1.0e-5\n")
    params = load_params([PARAMS, extra], ["refine.lr=5e-4", "contour.solver.method=rk4",
                                                         "contour.solver.step_size=0.25",
                                                         "contour.solver.first_step=null"])
    assert params.contour.solver.atol == 1e-5
    assert params.refine.lr == 5e-4
    assert params.contour.solver.method == "rk4"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("refine:\n  lrr: 1.0\n", "unknown key 'refine.lrr'"),
        ("refine:\n  epochs: three\n", "refine.epochs: expected int, got 'three'"),
        ("contour:\n  solver:\n    method: rk45\n", "contour.solver.method: expected one of"),
        ("pretrain:\n  batch_size: 0\n", "batch_size"),
        ("bogus_section: 1\n", "unknown key 'bogus_section'"),
        ("data:\n  source: nifti\n", "data: argument 'source' must be one of 'kits19', 'saliency', got 'nifti'"),
        ("- a\n- b\n", "expected a mapping"),
        ("refine: [\n", "not valid YAML"),
    ],
)
def test_bad_params_give_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params([path])
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("refine.lr")
    with pytest.raises(ConfigError, match="empty part"):
        parse_override("refine..lr=1")


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_params([tmp_path / "nope.yaml"])


def test_from_mapping_converts_lists_to_tuples() -> None:
    params = from_mapping(Params, {"ingest": {"hu_window": [-100, 200]}})
    assert params.ingest.hu_window == (-100.0, 200.0)


def test_set_gives_a_text_field_its_text() -> None:
    """YAML would read these as an int, a bool and a float: a field annotated str keeps the text (the Kubeflow
    steps pass str parameters this way); other fields keep YAML's typing and its checks."""
    assert load_params([PARAMS], ["evaluate.model_name=2024"]).evaluate.model_name == "2024"
    assert load_params([PARAMS], ["evaluate.model_name=1e3"]).evaluate.model_name == "1e3"
    assert load_params([PARAMS], ["evaluate.model_name=on"]).evaluate.model_name == "on"
    assert load_params([PARAMS], ["refine.epochs=4"]).refine.epochs == 4
    with pytest.raises(ConfigError, match=r"refine.epochs: expected int, got 'four'"):
        load_params([PARAMS], ["refine.epochs=four"])
    with pytest.raises(ConfigError, match=r"evaluate.model_name: expected str, got \[1, 2\]"):
        load_params([PARAMS], ["evaluate.model_name=[1, 2]"])


# the tests that compare with params.yaml (the ones a user's experiment used to break)
PARAMS_DEPENDENT = [
    "tests/test_pipelines.py::test_compiled_yaml_is_up_to_date",
    "tests/test_pipelines.py::test_every_params_key_is_a_pipeline_parameter_with_its_default",
    "tests/test_tune.py::test_write_solver_params_keeps_the_file_and_reads_back",
    "tests/test_params.py::test_committed_params_load_and_round_trip",
]


def _git(root: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True)


def _pytest(root: Path, *tests: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NODESEG_PIPELINE_DEFAULTS"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_params_dependent_tests_pass_after_a_users_experiment(tmp_path: Path) -> None:
    """A copy of the repository whose working params.yaml was rewritten as ``dvc exp run -S refine.lr=5e-4``
    leaves it (the change, flow lists re-serialised as block lists): the params-dependent tests still pass
    there, as they read the committed file. A committed params change without a recompile still fails."""
    if shutil.which("git") is None:
        pytest.skip("git must be on PATH")
    root = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    (root / "params.yaml").write_text(committed_text())
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "copy")

    working = yaml.safe_load((root / "params.yaml").read_text())
    working["refine"]["lr"] = 5e-4
    text = yaml.safe_dump(working, sort_keys=False, default_flow_style=False)
    assert "[" not in text.replace("[]", "")  # every flow list now a block list, as DVC writes them (an empty one stays [])
    (root / "params.yaml").write_text(text)
    assert load_params([root / "params.yaml"]).refine.lr == 5e-4 != load_params([PARAMS]).refine.lr
    done = _pytest(root, *PARAMS_DEPENDENT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"{len(PARAMS_DEPENDENT) + 2} passed" in done.stdout  # two of them run for training and tuning

    # the control: a committed params change that the committed pipeline YAML does not carry is caught
    committed = yaml.safe_load(committed_text(root))
    committed["refine"]["lr"] = 5e-4
    (root / "params.yaml").write_text(yaml.safe_dump(committed, sort_keys=False))
    _git(root, "commit", "-qam", "a new default, pipelines not recompiled")
    done = _pytest(root, "tests/test_pipelines.py::test_compiled_yaml_is_up_to_date")
    assert done.returncode == 1 and "2 failed" in done.stdout, done.stdout[-3000:]
    assert "training.yaml is stale" in done.stdout and "tuning.yaml is stale" in done.stdout
