"""params.yaml: the committed file loads, overrides apply, unknown keys and wrong types are refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nodeseg.config import flatten, from_mapping, to_mapping
from nodeseg.errors import ConfigError
from nodeseg.params import Params, dump_params, load_params, parse_override

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_load_and_round_trip(tmp_path: Path) -> None:
    params = load_params([REPO / "params.yaml"])
    assert params.contour.solver.rtol == 0.0
    assert params.select.samples == 8
    again = tmp_path / "again.yaml"
    again.write_text(dump_params(params))
    assert load_params([again]) == params


def test_every_dvc_params_key_exists() -> None:
    """Each params key dvc.yaml lists for a stage names a real section or field."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    known = set(flatten(to_mapping(Params())))
    sections = {k.split(".")[0] for k in known}
    for name, stage in stages.items():
        for key in stage.get("params", []):
            assert key in sections or key in known, f"dvc.yaml stage {name}: unknown params key {key!r}"


def test_overrides_and_later_files_win(tmp_path: Path) -> None:
    extra = tmp_path / "tuned.yaml"
    extra.write_text("contour:\n  solver:\n    atol: 1.0e-5\n")
    params = load_params([REPO / "params.yaml", extra], ["refine.lr=5e-4", "contour.solver.method=rk4",
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
    p = load_params([REPO / "params.yaml"], ["evaluate.model_name=2024", "data.root=1e3"])
    assert (p.evaluate.model_name, p.data.root) == ("2024", "1e3")
    assert load_params([REPO / "params.yaml"], ["evaluate.model_name=on"]).evaluate.model_name == "on"
    assert load_params([REPO / "params.yaml"], ["refine.epochs=4"]).refine.epochs == 4
    with pytest.raises(ConfigError, match=r"refine.epochs: expected int, got 'four'"):
        load_params([REPO / "params.yaml"], ["refine.epochs=four"])
    with pytest.raises(ConfigError, match=r"evaluate.model_name: expected str, got \[1, 2\]"):
        load_params([REPO / "params.yaml"], ["evaluate.model_name=[1, 2]"])
