"""MLflow tracking for stage runs: rank 0 only, a local sqlite store unless MLFLOW_TRACKING_URI says otherwise."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "nodeseg"
_MAX_PARAM_LEN = 6000
_MAX_BATCH = 1000  # metrics per log_batch call (MLflow's limit)


def tracking_uri(workdir: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<workdir>/mlflow.db`` (no server needed)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    root = Path(workdir) if workdir is not None else Path.cwd()
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def configure(workdir: Path | None = None) -> str:
    """Point MLflow at :func:`tracking_uri` (tracking and registry) and return the URI."""
    import mlflow

    uri = tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI", "").strip() or uri)
    return uri


class Tracker:
    """One MLflow run. Disabled trackers (other DDP ranks, ``enabled=False``) accept every call and do nothing."""

    def __init__(
        self,
        stage: str,
        *,
        enabled: bool = True,
        workdir: Path | None = None,
        experiment: str | None = None,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.stage = stage
        self.enabled = enabled
        self.run_id: str | None = None
        self._workdir = workdir
        self._experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self._parent = parent_run_id
        self._run_name = run_name or stage
        self._tags = {"nodeseg.stage": stage, **(tags or {})}

    def __enter__(self) -> Tracker:
        if not self.enabled:
            return self
        import mlflow

        configure(self._workdir)
        mlflow.set_experiment(self._experiment)
        tags = dict(self._tags)
        if self._parent:
            tags["mlflow.parentRunId"] = self._parent
        run = mlflow.start_run(run_name=self._run_name, tags=tags, nested=bool(self._parent))
        self.run_id = run.info.run_id
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.enabled or self.run_id is None:
            return
        import mlflow

        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C, or SIGTERM through nodeseg.errors.Terminated
            status = "KILLED"
            self.set_tags({"nodeseg.error": f"stopped by {exc}" if str(exc) else "interrupted"})
        else:
            status = "FAILED"
            self.set_tags({"nodeseg.error": str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__})
        mlflow.end_run(status=status)

    # -- logging ---------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat params (values stringified and truncated to MLflow's limit)."""
        if not self.enabled:
            return
        import mlflow

        clean = {k: str(v)[:_MAX_PARAM_LEN] for k, v in params.items()}
        items = list(clean.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log finite numeric metrics; non-finite values are skipped with a debug message."""
        if not self.enabled:
            return
        import mlflow

        clean = {}
        for k, v in metrics.items():
            if v is None:
                continue
            v = float(v)
            if math.isfinite(v):
                clean[k] = v
            else:
                log.debug("metric %s=%s not logged (non-finite)", k, v)
        if clean:
            mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder to the run's artifact store."""
        if not self.enabled:
            return
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_metric_history(self, rows: Sequence[tuple[Mapping[str, float], int]]) -> None:
        """Log many ``(metrics, step)`` rows at once (batched; non-finite values skipped as in
        :meth:`log_metrics`): the history a resumed training run carries over from its checkpoint."""
        if not self.enabled or self.run_id is None:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for row, step in rows for k, v in row.items()
                   if v is not None and math.isfinite(float(v))]
        client = MlflowClient()
        for i in range(0, len(metrics), _MAX_BATCH):
            client.log_batch(self.run_id, metrics=metrics[i: i + _MAX_BATCH])

    def resumes(self, checkpoint_run: str) -> None:
        """Record that this run resumes from a checkpoint written under ``checkpoint_run``, and close the runs
        that processes killed outright (SIGKILL, a lost node, the OOM killer) left RUNNING: that run, and the
        runs (of this experiment) that resumed from the same checkpoint before this one without ever writing
        one.

        A closed run is marked KILLED and tagged ``nodeseg.restarted_as`` with this run's id; this run is
        tagged ``nodeseg.resumes_run``. A run another tracking store holds is only named.
        """
        if not self.enabled or self.run_id is None or not checkpoint_run or checkpoint_run == self.run_id:
            return
        from mlflow import MlflowClient

        self.set_tags({"nodeseg.resumes_run": checkpoint_run})
        self.close_abandoned(checkpoint_run)
        client = MlflowClient()
        experiment = client.get_run(self.run_id).info.experiment_id
        for run in client.search_runs([experiment], filter_string=f"tags.`nodeseg.resumes_run` = '{checkpoint_run}' "
                                                                  "and attributes.status = 'RUNNING'"):
            if run.info.run_id != self.run_id:
                self._close(client, run.info.run_id)

    def close_abandoned(self, run_id: str) -> None:
        """Mark ``run_id`` KILLED, tagged ``nodeseg.restarted_as`` with this run's id, if a process that did not
        end it left it RUNNING (killed outright); otherwise, or where this tracking store does not hold it,
        leave it."""
        if not self.enabled or self.run_id is None or not run_id or run_id == self.run_id:
            return
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient()
        try:
            status = client.get_run(run_id).info.status
        except MlflowException:  # another tracking store, or deleted
            log.debug("MLflow run %s is not in this tracking store; left alone", run_id)
            return
        if status == "RUNNING":
            self._close(client, run_id)

    def _close(self, client: Any, run_id: str) -> None:
        client.set_terminated(run_id, status="KILLED")
        client.set_tag(run_id, "nodeseg.restarted_as", self.run_id)
        log.info("MLflow run %s was left RUNNING by a process that did not end it: marked KILLED", run_id)
