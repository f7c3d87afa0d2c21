"""Every params.yaml key as a typed pipeline parameter, derived from ``nodeseg.params.Params``.

A key ``refine.lr`` becomes the parameter ``refine__lr``; its type comes from the dataclass field
(``int``, ``float``, ``bool``, ``str``, ``list``, ``dict``) and its default from the committed
params.yaml (with the dataclass defaults for keys the file leaves out). A field that may be null
(``float | None`` ...) travels as YAML text (``str``: ``"null"``, ``"0.5"``), since KFP parameters
cannot be null. Components receive the keys of the sections their stage reads (the ``params`` lists of
dvc.yaml and tuning/dvc.yaml) as ``--set key=value``.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from nodeseg.config import to_mapping
from nodeseg.params import RUNTIME_KEYS, Params, load_params

REPO = Path(__file__).resolve().parents[1]
#: the params file whose values are the pipeline parameters' defaults (what `compile` writes into the YAML):
#: params.yaml, or the file named by $NODESEG_PIPELINE_DEFAULTS (the tests point it at the committed file)
PARAMS_FILE = Path(os.environ.get("NODESEG_PIPELINE_DEFAULTS") or REPO / "params.yaml")
DVC_FILES = (REPO / "dvc.yaml", REPO / "tuning" / "dvc.yaml")
SEP = "__"  # refine.lr -> refine__lr

#: stages that dvc.yaml does not list, and the params sections they read
EXTRA_SECTIONS: dict[str, tuple[str, ...]] = {"register": ("evaluate",), "predict": ()}


@dataclass(frozen=True)
class PipelineParam:
    """One params.yaml key as a pipeline parameter."""

    key: str  # dotted params key: refine.lr
    type: type  # int, float, bool, str, list or dict
    default: Any
    yaml_text: bool = False  # a nullable key: the value is YAML text

    @property
    def name(self) -> str:
        """The pipeline and component parameter name: ``refine__lr``."""
        return param_name(self.key)

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]


def param_name(key: str) -> str:
    """``refine.lr`` -> ``refine__lr``."""
    return key.replace(".", SEP)


def yaml_text(value: Any) -> str:
    """A value as the one-line YAML that ``--set key=value`` parses back to it (floats as 1.0e-06: PyYAML
    reads 1e-06 as a string)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=2**31).removesuffix("\n...\n").strip()


def _kfp_type(hint: Any) -> tuple[type, bool]:
    """(the KFP parameter type, whether it travels as YAML text) for a dataclass field's type hint."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return str, True
    if origin is Literal:
        kinds = {type(a) for a in get_args(hint)}
        if len(kinds) != 1:
            return str, True
        return kinds.pop(), False
    if origin in (list, tuple) or hint in (list, tuple):
        return list, False
    if origin is dict or hint is dict or origin is Mapping:
        return dict, False
    if hint in (bool, int, float, str):
        return hint, False
    raise TypeError(f"params field type {hint!r} has no pipeline parameter type (expected bool, int, float, str,"
                    " a list, a mapping, a Literal or an optional of those)")


def _walk(cls: type, values: Mapping[str, Any], prefix: str) -> Iterator[PipelineParam]:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, value, key = hints[f.name], values[f.name], prefix + f.name
        if dataclasses.is_dataclass(hint):
            yield from _walk(hint, value, key + ".")
            continue
        kind, as_text = _kfp_type(hint)
        yield PipelineParam(key, kind, yaml_text(value) if as_text else value, as_text)


def derive(params: Params) -> tuple[PipelineParam, ...]:
    """The pipeline parameters of ``params``: one per leaf key, in the order of the dataclasses."""
    return tuple(_walk(Params, to_mapping(params), ""))


@cache
def pipeline_params() -> tuple[PipelineParam, ...]:
    """The pipeline parameters with the committed params.yaml as defaults."""
    return derive(load_params([PARAMS_FILE]))


@cache
def stage_sections() -> dict[str, tuple[str, ...]]:
    """CLI stage name -> the params keys or sections it reads: the ``params`` lists of :data:`DVC_FILES` (the
    keys its output depends on) plus the :data:`~nodeseg.params.RUNTIME_KEYS` of the sections it lists (read,
    but no reason to rerun), plus :data:`EXTRA_SECTIONS`."""
    out: dict[str, tuple[str, ...]] = {}
    for path in DVC_FILES:
        for name, spec in yaml.safe_load(path.read_text())["stages"].items():
            entries = tuple(spec.get("params", ()))
            bad = [e for e in entries if not isinstance(e, str)]
            if bad:
                raise ValueError(f"{path}: stage {name}: params entry {bad[0]!r} is not a params.yaml key")
            sections = {e.split(".")[0] for e in entries}
            out[name.replace("_", "-")] = entries + tuple(k for k in RUNTIME_KEYS if k.split(".")[0] in sections)
    return {**out, **EXTRA_SECTIONS}


def stage_params(stage: str, exclude: Sequence[str] = ()) -> tuple[PipelineParam, ...]:
    """The pipeline parameters ``stage`` reads, less the keys in ``exclude``."""
    sections = stage_sections()
    if stage not in sections:
        raise ValueError(f"unknown stage {stage!r}: expected one of {sorted(sections)}")
    wanted = sections[stage]
    return tuple(
        p for p in pipeline_params()
        if p.key not in exclude and any(p.key == w or p.key.startswith(w + ".") for w in wanted)
    )


def by_name() -> dict[str, PipelineParam]:
    """Pipeline parameter name -> its description."""
    return {p.name: p for p in pipeline_params()}
