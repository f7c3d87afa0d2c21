"""The sections of params.yaml as one typed object, loaded strictly, with ``--set key=value`` overrides."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml

from nodeseg.config import from_mapping, read_yaml, to_mapping
from nodeseg.data.ingest_config import IngestConfig
from nodeseg.data.readers import READERS
from nodeseg.data.render import PhantomConfig
from nodeseg.errors import ConfigError, check_arg
from nodeseg.priors import PriorsConfig
from nodeseg.solve import SolverConfig
from nodeseg.stages.select import SelectConfig
from nodeseg.train.loop import RUNTIME_FIELDS, TrainConfig
from nodeseg.tuning.config import TuneConfig


@dataclass(frozen=True)
class DataSection:
    """What the raw data is (its folder is on the command line: ``nodeseg preprocess --raw``)."""

    source: str = "kits19"  # a reader of nodeseg.data.readers.READERS: kits19, saliency
    workers: int = 0  # preprocessing processes; 0 = every core

    def __post_init__(self) -> None:
        check_arg(self.source in READERS, "source", self.source, "one of " + ", ".join(map(repr, READERS)))
        check_arg(self.workers >= 0, "workers", self.workers, ">= 0 (0 = every core)")


@dataclass(frozen=True)
class ModelSection:
    """A model: a preset from ``nodeseg.models.registry.PRESETS`` and overrides of its sizes."""

    preset: str = "unet-tiny"
    sizes: dict[str, Any] = field(default_factory=dict)
    solver: SolverConfig = field(default_factory=SolverConfig)  # ignored by the plain UNet
    # the solver of eval mode (validation, evaluate, predict); null: ``solver``. Recorded in the model spec
    inference_solver: SolverConfig | None = None


@dataclass(frozen=True)
class ContourSection(ModelSection):
    """The Contour Evolution model: a ``ModelSection`` with the priors on its ODE (``nodeseg.priors``)."""

    priors: PriorsConfig = field(default_factory=PriorsConfig)


@dataclass(frozen=True)
class EvaluateConfig:
    """Metrics, figures and the registry rule of ``nodeseg evaluate``."""

    beta2: float = 0.3  # adaptive F-beta (the paper)
    weighted_beta2: float = 1.0  # weighted F-beta: Margolin's code hard-codes beta = 1
    empty_gt: Literal["zero", "skip"] = "zero"
    saliency_width: float = 1.0  # saliency map (1 - tanh(φ / width)) / 2 scored by the F-beta measures (pixels)
    batch_size: int = 8
    figure_samples: int = 4
    figure_times: int = 5  # intermediate ODE times shown in the evolution figure
    register: bool = True  # register the models and move the champion alias
    model_name: str = "nodeseg"
    champion_metric: Literal["iou", "adaptive_fbeta", "weighted_fbeta"] = "iou"
    min_improvement: float = 0.0  # the refined model must beat the UNet by more than this

    def __post_init__(self) -> None:
        check_arg(self.beta2 > 0, "beta2", self.beta2, "> 0")
        check_arg(self.weighted_beta2 > 0, "weighted_beta2", self.weighted_beta2, "> 0")
        check_arg(self.saliency_width > 0, "saliency_width", self.saliency_width, "> 0")
        check_arg(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check_arg(self.figure_samples >= 0, "figure_samples", self.figure_samples, ">= 0")
        check_arg(self.figure_times >= 2, "figure_times", self.figure_times, ">= 2")
        check_arg(bool(self.model_name.strip()), "model_name", self.model_name, "a non-empty name")
        check_arg(self.min_improvement >= 0, "min_improvement", self.min_improvement, ">= 0")


def _unet_default() -> ModelSection:
    return ModelSection(preset="unet-tiny")


def _node_default() -> ModelSection:
    return ModelSection(preset="tiny")


def _contour_default() -> ContourSection:
    return ContourSection(preset="tiny")


@dataclass(frozen=True)
class Params:
    """Everything in params.yaml."""

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    data: DataSection = field(default_factory=DataSection)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    unet: ModelSection = field(default_factory=_unet_default)
    contour: ContourSection = field(default_factory=_contour_default)
    image: ModelSection = field(default_factory=_node_default)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    refine: TrainConfig = field(default_factory=TrainConfig)
    image_evolve: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        check_arg(self.seed >= 0, "seed", self.seed, ">= 0")


def _runtime_keys() -> tuple[str, ...]:
    hints = get_type_hints(Params)
    training = [f.name for f in dataclasses.fields(Params) if hints[f.name] is TrainConfig]
    return ("data.workers", *(f"{s}.{name}" for s in training for name in RUNTIME_FIELDS))


#: the keys that change how a stage runs (processes, log cadence), never what it writes: the stage reads them, but
#: dvc.yaml does not list them, so changing one reruns nothing (a training resume ignores them too)
RUNTIME_KEYS: tuple[str, ...] = _runtime_keys()


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'refine.lr=1e-4'`` → (['refine', 'lr'], 0.0001); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. refine.lr=1e-4")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {item!r}: the key {key!r} has an empty part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {item!r}: the value {raw!r} is not valid YAML") from None
    return parts, value


def _is_text_field(keys: Sequence[str]) -> bool:
    """Whether the params key ``keys`` is a field annotated exactly ``str``."""
    cls: Any = Params
    for i, key in enumerate(keys):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = get_type_hints(cls)
        if key not in hints:
            return False
        if i == len(keys) - 1:
            return hints[key] is str
        cls = hints[key]
    return False


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_params(paths: Sequence[str | Path] = ("params.yaml",), overrides: Sequence[str] = ()) -> Params:
    """Read and merge params files (later ones win), apply ``--set`` overrides, check every key and type."""
    data: dict[str, Any] = {}
    sources = []
    for p in paths:
        data = merge(data, read_yaml(p))
        sources.append(str(p))
    for item in overrides:
        keys, value = parse_override(item)
        if isinstance(value, (bool, int, float)) and _is_text_field(keys):
            value = item.split("=", 1)[1].strip()  # a text field takes the text: model_name=2024 or =on
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = value
    source = " + ".join(sources) if sources else "params"
    if overrides:
        source += " (with --set)"
    return from_mapping(Params, data, source=source)


def dump_params(params: Params) -> str:
    """Params as YAML text (what a run actually used)."""
    return yaml.safe_dump(to_mapping(params), sort_keys=False)
