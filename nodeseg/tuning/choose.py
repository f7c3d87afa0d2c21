"""The operating point: the cheapest trial whose accuracy is within a stated margin of the best.

Rule (over COMPLETE trials; values = (accuracy, NFE per training step, seconds per training step, peak
memory MiB)), with ``max_peak_memory_mb`` set, over those whose peak memory is within it: the best accuracy is the highest validation IoU (objective ``iou``) or the lowest validation loss
(``loss``); eligible are the trials with IoU >= best - ``within_iou`` (0.005 = 0.5 IoU points) or with loss
<= best x (1 + ``within_loss``); of those the one with the fewest NFE per step wins, ties broken by fewer
seconds per step, then the better accuracy, then the lower trial number. The winner is written into
``contour.solver`` (and ``contour.inference_solver`` and refine's regulariser weights) of a params file with ruamel.yaml, keeping its comments and layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from nodeseg.atomic import atomic_file
from nodeseg.errors import NodesegError
from nodeseg.tuning.config import TuneConfig


def rule_text(cfg: TuneConfig) -> str:
    """The rule in one sentence (stored with the study and in choice.json)."""
    if cfg.maximize:
        near = f"validation IoU within {cfg.within_iou:g} ({cfg.within_iou * 100:g} IoU points) of the best"
    else:
        near = f"validation loss within {cfg.within_loss * 100:g} % of the best"
    budget = "" if cfg.max_peak_memory_mb is None else f" and a peak memory within {cfg.max_peak_memory_mb:g} MiB"
    return (f"the fewest NFE per training step among the complete trials with {near}{budget}; ties: fewer "
            "seconds per step, then better accuracy, then the lower trial number")


def eligible(trials: Sequence[FrozenTrial], cfg: TuneConfig) -> list[FrozenTrial]:
    """The COMPLETE trials close enough to the best accuracy (see the module docstring)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    if cfg.max_peak_memory_mb is not None:
        done = [t for t in done if len(t.values) < 4 or t.values[3] <= cfg.max_peak_memory_mb]
    if not done:
        states = {}
        for t in trials:
            states[t.state.name] = states.get(t.state.name, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no trials"
        raise NodesegError(f"no trial completed ({summary}): nothing to choose; see the fail_reason user "
                           "attributes, or widen the caps (tune.max_nfe) and the tolerance ranges")
    accuracy = [t.values[0] for t in done]
    if cfg.maximize:
        best = max(accuracy)
        return [t for t in done if t.values[0] >= best - cfg.within_iou]
    best = min(accuracy)
    return [t for t in done if t.values[0] <= best + abs(best) * cfg.within_loss]


def choose_operating_point(trials: Sequence[FrozenTrial], cfg: TuneConfig) -> FrozenTrial:
    """The trial the rule picks; ``NodesegError`` when no trial completed."""
    sign = -1.0 if cfg.maximize else 1.0
    return min(eligible(trials, cfg), key=lambda t: (t.values[1], t.values[2], sign * t.values[0], t.number))


def _yaml_float(value: float) -> str:
    """``repr`` with a dot in the mantissa, so YAML 1.1 readers (PyYAML) also see a float: 1e-05 → 1.0e-05."""
    text = repr(float(value))
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def write_solver_params(path: str | Path, solver: Mapping[str, Any],
                        extra: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Set ``contour.solver.<key>`` for each key of ``solver`` in the YAML file ``path`` (atomically), and
    ``<section>.<key>`` for each of ``extra`` (e.g. ``{"refine": {"kinetic_energy": 0.01}}``), keeping
    comments, order and the other keys; the result must still load with ``load_params``."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.representer import RoundTripRepresenter

    from nodeseg.config import to_mapping
    from nodeseg.params import load_params

    class Representer(RoundTripRepresenter):
        pass

    Representer.add_representer(float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", _yaml_float(v)))
    Representer.add_representer(type(None), lambda r, v: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    path = Path(path)
    yaml = YAML()  # round trip
    yaml.Representer = Representer
    doc = yaml.load(path.read_text()) if path.exists() else None
    doc = CommentedMap() if doc is None else doc
    contour = doc.setdefault("contour", CommentedMap())
    node = contour.setdefault("solver", CommentedMap())
    for key, value in solver.items():
        node[key] = float(value) if isinstance(value, float) else value
    for section, values in (extra or {}).items():
        target = doc.setdefault(section, CommentedMap())
        for key, value in values.items():
            target[key] = float(value) if isinstance(value, float) else value
    with atomic_file(path) as tmp:
        with tmp.open("w") as fh:
            yaml.dump(doc, fh)
        loaded = load_params([tmp]).contour.solver
        wrong = {k: getattr(loaded, k) for k, v in solver.items() if getattr(loaded, k) != v}
        params = load_params([tmp])
        for section, values in (extra or {}).items():
            for key, value in values.items():
                got = to_mapping(getattr(getattr(params, section), key))
                if isinstance(value, Mapping) and isinstance(got, dict):  # the written keys of a sub-section
                    got = {k: got.get(k) for k in value}
                if got != value:
                    wrong[f"{section}.{key}"] = got
        if wrong:
            raise NodesegError(f"{path}: the tuned solver did not read back: {wrong} != {dict(solver)}")
