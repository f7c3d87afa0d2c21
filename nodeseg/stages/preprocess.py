"""`nodeseg preprocess`: raw cases (KiTS19 layout) or a saliency folder → parquet shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nodeseg.config import flatten
from nodeseg.data.ingest import build_shards
from nodeseg.params import Params
from nodeseg.tracking import Tracker


def preprocess(raw: Path, out: Path, params: Params) -> dict[str, Any]:
    """Ingest ``raw`` (``params.data.source``) into ``out/{train,val}/part-*.parquet`` + manifest.json."""
    with Tracker("preprocess") as tracker:
        tracker.log_params({"seed": params.seed, "data.source": params.data.source,
                            **flatten(params.ingest, "ingest.")})
        manifest = build_shards(params.data.source, Path(raw), Path(out), params.ingest, params.seed,
                                workers=params.data.workers)
        tracker.log_metrics({f"rows_{split}": info["rows"] for split, info in manifest["splits"].items()})
        tracker.log_artifact(Path(out) / "manifest.json")
    return manifest
