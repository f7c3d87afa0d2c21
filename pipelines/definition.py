"""A pipeline as data: its own options, every params.yaml key, and the graph function that wires the steps.

:meth:`PipelineDef.build` turns it into a kfp pipeline whose parameters are the options followed by every
params.yaml key (:func:`components.params.pipeline_params`), for the cluster or for ``kfp.local``; the graph
function receives the parameters by name and a :class:`pipelines.steps.Steps` for the mode.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler, dsl
from kfp.dsl.base_component import BaseComponent

from components import Cluster, pipeline_params
from components.params import param_name
from pipelines.steps import Steps

REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Option:
    """A pipeline parameter that is not a params.yaml key (``default`` :data:`REQUIRED`: must be given)."""

    name: str
    type: type
    default: Any
    help: str


Graph = Callable[[Mapping[str, Any], Steps], None]


@dataclass(frozen=True)
class Parameter:
    """One pipeline parameter: its name, type, default, and whether its value is YAML text."""

    name: str
    type: type
    default: Any
    yaml_text: bool = False
    key: str | None = None  # the params.yaml key, for params


@dataclass(frozen=True)
class PipelineDef:
    """A nodeseg pipeline: name, options, graph; compiled to ``package`` (the YAML beside its source)."""

    name: str
    description: str
    options: tuple[Option, ...]
    graph: Graph
    package: Path

    def parameters(self) -> tuple[Parameter, ...]:
        """The options (required ones first), then one parameter per params.yaml key."""
        opts = sorted(self.options, key=lambda o: o.default is not REQUIRED)
        out = [Parameter(o.name, o.type, o.default) for o in opts]
        out += [Parameter(p.name, p.type, p.default, p.yaml_text, p.key) for p in pipeline_params()]
        names = [p.name for p in out]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise ValueError(f"pipeline {self.name}: options named like params keys: {clash}")
        return tuple(out)

    def build(self, *, local: bool = False, cluster: Cluster | None = None) -> BaseComponent:
        """The kfp pipeline: container steps for a cluster, or the stand-ins ``kfp.local`` runs."""
        steps = Steps(local=local, cluster=cluster)
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        signature = inspect.Signature([
            inspect.Parameter(p.name, kind, annotation=p.type, default=p.default) for p in self.parameters()
        ])

        def pipeline_func(*args: Any, **kwargs: Any) -> None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self.graph(bound.arguments, steps)

        pipeline_func.__signature__ = signature  # type: ignore[attr-defined]
        pipeline_func.__name__ = pipeline_func.__qualname__ = self.name.replace("-", "_")
        pipeline_func.__doc__ = self.description
        return dsl.pipeline(name=self.name, description=self.description)(pipeline_func)

    def compile(self, output: Path | None = None, cluster: Cluster | None = None) -> Path:
        """Write the compiled pipeline YAML (default: :attr:`package`)."""
        path = Path(output or self.package)
        compiler.Compiler().compile(self.build(cluster=cluster), package_path=str(path))
        return path

    def arguments(self, overrides: Sequence[str]) -> dict[str, Any]:
        """``KEY=VALUE`` items (a params key like ``refine.lr`` or a parameter name like ``refine__lr`` or
        ``distributed``) as run arguments, each checked against its parameter's type."""
        params = {p.name: p for p in self.parameters()}
        out: dict[str, Any] = {}
        for item in overrides:
            key, sep, raw = item.partition("=")
            name = param_name(key.strip())
            if not sep or not key.strip():
                raise ValueError(f"expected KEY=VALUE, got {item!r}")
            if name not in params:
                near = difflib.get_close_matches(name, list(params), n=3)
                hint = f"; did you mean {', '.join(near)}?" if near else " (see --help for the list)"
                raise ValueError(f"{item!r}: {key!r} is not a parameter of pipeline {self.name}{hint}")
            out[name] = parse_value(params[name], raw)
        missing = [p.name for p in params.values() if p.default is REQUIRED and p.name not in out]
        if missing:
            raise ValueError(f"pipeline {self.name}: give {', '.join(f'{m}=...' for m in missing)}")
        return out


def parse_value(param: Parameter, raw: str) -> Any:
    """The text of ``--set`` as a value of ``param``'s type (YAML for numbers, booleans, lists, mappings)."""
    if param.type is str:  # text as given: 'on' or '1e-3' stay strings (YAML text params included)
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ValueError(f"{param.name}={raw!r}: not valid YAML") from None
    expected = {bool: (bool,), int: (int,), float: (int, float), list: (list,), dict: (dict,)}[param.type]
    if isinstance(value, str) and param.type is float:  # YAML 1.1 reads 1e-3 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, expected) or (param.type is not bool and isinstance(value, bool)):
        raise ValueError(f"{param.name}={raw!r}: expected {param.type.__name__}, got {type(value).__name__}")
    return float(value) if param.type is float else value
