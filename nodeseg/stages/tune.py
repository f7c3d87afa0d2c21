"""`nodeseg tune`: a multi-objective Optuna study of the Contour Evolution solver (tolerance against NFE cost).

Phases (``--phase``): ``create`` makes the study once (objectives, the MLflow parent run, the reference
trial, the pruning companion); ``optimize`` runs trials in ``workers`` local processes that join it; ``report``
writes the Pareto table and plots, applies the operating-point rule and writes the chosen solver into a
params file. ``all`` (the default) does the three in turn. On Kubeflow, one task runs ``create``, parallel
tasks run ``optimize --workers 1 --worker-index I`` against the same storage, and a last task ``report``.

Each trial is a short refinement through :func:`nodeseg.train.loop.fit` (the loop every stage uses) from the
same selected UNet, with the same seed, data order and initial weights; only the solver changes. A trial
whose solve hits the NFE or step cap, or whose loss diverges, ends FAIL with its reason in the
``fail_reason`` user attribute; the study goes on. A trial whose worker is stopped (SIGTERM) or dies (its
heartbeat stops) is queued again with the same solver and resumes from its checkpoints (docs/tuning.md).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from nodeseg.config import flatten, to_mapping
from nodeseg.errors import (
    ConfigError,
    NodesegError,
    SolverError,
    Terminated,
    TrainingDiverged,
    sigterm_raises,
)
from nodeseg.params import Params
from nodeseg.stages._training import data_info, datasets, image_channels
from nodeseg.stages.refine import contour_builder
from nodeseg.tracking import Tracker
from nodeseg.train import ddp
from nodeseg.train.loop import fit
from nodeseg.tuning import DEFAULT_STUDY, choose, report
from nodeseg.tuning.config import TuneConfig
from nodeseg.tuning.memory import PeakMemory
from nodeseg.tuning.pruning import SUFFIX as PRUNING_SUFFIX
from nodeseg.tuning.pruning import EpochPruning, create_pruning_study, make_pruner
from nodeseg.tuning.space import (
    reference_params,
    suggest_inference,
    suggest_regularisers,
    suggest_solver,
    tuned_keys,
)
from nodeseg.tuning.storage import default_storage, load_study, open_storage, redact, retry_callback

log = logging.getLogger(__name__)

Phase = Literal["all", "create", "optimize", "report"]
PHASES: tuple[str, ...] = ("all", "create", "optimize", "report")
#: what ends a trial as FAIL (recorded, the study goes on); anything else is a bug and stops the worker
TRIAL_FAILURES: tuple[type[BaseException], ...] = (SolverError, TrainingDiverged, torch.OutOfMemoryError)


@dataclass(frozen=True)
class TuneResult:
    """What ``report`` leaves: the study, the counts per state, the chosen trial and its solver, the files."""

    study_name: str
    storage: str  # password redacted
    states: dict[str, int]
    chosen: int
    solver: dict[str, Any]
    files: dict[str, str]


def _directions(cfg: TuneConfig) -> list[str]:
    return ["maximize" if cfg.maximize else "minimize", "minimize", "minimize", "minimize"]


def create_study(storage: str, study_name: str, params: Params) -> optuna.Study:
    """Create the study (or load it when it exists with the same objectives) and its pruning companion.

    A new study gets the metric names, the rule, an MLflow parent run (its id in the ``mlflow_run_id``
    study attribute, for every worker's child runs) and, when ``tune.reference_atol`` is set, the
    reference trial enqueued first.
    """
    cfg = params.tune
    store = open_storage(storage)
    try:
        study = optuna.create_study(storage=store, study_name=study_name, directions=_directions(cfg))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=store)
        _check_objective(study, cfg, storage)
        log.info("study %s exists in %s (%d trials): joining it", study_name, redact(storage), len(study.trials))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(cfg.metric_names)
        with Tracker("tune", run_name=study_name,
                     tags={"optuna.study": study_name, "optuna.storage": redact(storage)}) as parent:
            parent.log_params({"seed": params.seed, **flatten(cfg, "tune."),
                               **flatten(params.contour.solver, "contour.solver.")})
        study.set_user_attr("mlflow_run_id", parent.run_id)
        study.set_user_attr("objective", cfg.objective)
        study.set_user_attr("rule", choose.rule_text(cfg))
        study.set_user_attr("tune", to_mapping(cfg))
        reference = reference_params(cfg)
        if reference is not None:
            study.enqueue_trial(reference, user_attrs={"reference": True})
        log.info("created study %s in %s", study_name, redact(storage))
    create_pruning_study(store, study_name, cfg.maximize)
    return study


def _check_objective(study: optuna.Study, cfg: TuneConfig, storage: str) -> None:
    """Refuse to join or report on a study whose directions do not fit ``tune.objective``."""
    stored = [d.name.lower() for d in study.directions]
    if stored != _directions(cfg):
        raise ConfigError(f"study {study.study_name!r} in {redact(storage)} has directions {stored} (objective "
                          f"{study.user_attrs.get('objective')!r}), but tune.objective={cfg.objective!r} needs "
                          f"{_directions(cfg)}; use another --study-name or the study's objective")


def _step_means(train_log: Path) -> dict[str, float]:
    """Mean NFE forward/backward and seconds per training step from fit's ``train_log.csv``."""
    with train_log.open() as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise NodesegError(f"{train_log}: no training steps were logged")
    return {k: statistics.fmean(float(r[k]) for r in rows) for k in ("nfe_forward", "nfe_backward", "seconds")}


class TrialRunner:
    """The objective: one short refinement per trial; data and the UNet are loaded once per worker."""

    def __init__(self, shards: Path, unet_checkpoint: Path, out: Path, params: Params,
                 study: optuna.Study, pruning: optuna.Study) -> None:
        self.params, self.cfg = params, params.tune
        self.out = Path(out)
        self.study, self.pruning = study, pruning
        self.parent_run_id = study.user_attrs.get("mlflow_run_id")
        self.train_cfg = dataclasses.replace(params.refine, epochs=self.cfg.epochs,
                                             max_batches_per_epoch=self.cfg.max_batches_per_epoch)
        self.info = ddp.setup(params.device)
        self.data_id, preprocessing = data_info(Path(shards))
        self.train_set, self.val_set = datasets(Path(shards), self.train_cfg, params.seed)
        self.preprocessing = preprocessing
        self.channels = image_channels(self.train_set)
        self.build = contour_builder(Path(unet_checkpoint), params.contour, Path(shards))
        self.build(self.channels)  # checks the UNet against the shards before any trial starts

    def _build(self, solver: Any, inference: Any = None) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Contour Evolution on the frozen UNet, as ``nodeseg refine`` builds it, with the trial's solvers."""
        torch.manual_seed(self.params.seed)  # every trial starts from the same weights
        section = dataclasses.replace(self.params.contour, solver=solver, inference_solver=inference)
        model, spec = self.build(self.channels, section)
        return model, {**spec, "preprocessing": self.preprocessing}

    def _frozen(self, trial: optuna.Trial) -> FrozenTrial:
        """The trial as stored (Optuna 5's ``Trial`` no longer shows its system attributes)."""
        return self.study._storage.get_trial(trial._trial_id)

    def _take_over(self, trial: optuna.Trial, trial_dir: Path) -> str | None:
        """For a trial that runs an earlier one again (its worker died or was stopped; ``retry_history`` in
        the system attributes): move the earlier trial's folder here, so that training resumes from its
        checkpoints, and end its pruning twin if still RUNNING. Returns the earlier trial's MLflow run id (None
        for a first run)."""
        history = self._frozen(trial).system_attrs.get("retry_history") or []
        if not history:
            return None
        previous = int(history[-1])
        before = self.out / "trials" / f"trial-{previous:04d}"
        if before.is_dir():
            os.replace(before, trial_dir)
        twin = trial.user_attrs.get("pruning_trial")  # the user attributes are the earlier trial's until set again
        if twin is not None:
            stale = [t for t in self.pruning.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                     if t.number == twin]
            if stale:
                self.pruning.tell(twin, state=TrialState.FAIL)
        trial.set_user_attr("retry_of", previous)
        log.info("trial %d runs trial %d again (its worker stopped)%s", trial.number, previous,
                 ", resuming from its checkpoints" if (trial_dir / "checkpoints").is_dir() else "")
        return trial.user_attrs.get("mlflow_run_id")

    def __call__(self, trial: optuna.Trial) -> tuple[float, float, float, float]:
        cfg = self.cfg
        trial_dir = self.out / "trials" / f"trial-{trial.number:04d}"
        shutil.rmtree(trial_dir, ignore_errors=True)
        earlier_run = self._take_over(trial, trial_dir)
        solver = suggest_solver(trial, cfg, self.params.contour.solver)
        inference = suggest_inference(trial, cfg, solver)
        weights = suggest_regularisers(trial, cfg)
        train_cfg = dataclasses.replace(self.train_cfg, **weights)
        trial.set_user_attr("solver", tuned_keys(solver))
        trial.set_user_attr("inference_solver", None if inference is None else tuned_keys(inference))
        trial.set_user_attr("regularisers", weights)
        twin = EpochPruning(self.pruning, trial.number)
        trial.set_user_attr("pruning_trial", twin.number)
        state = TrialState.FAIL
        pruned: optuna.TrialPruned | None = None
        terminated = False
        tags = {"optuna.study": self.study.study_name, "optuna.trial": str(trial.number)}
        try:
            with Tracker("tune", parent_run_id=self.parent_run_id, tags=tags,
                         run_name=f"{self.study.study_name}/trial-{trial.number}") as tracker:
                if earlier_run:
                    tracker.close_abandoned(earlier_run)
                trial.set_user_attr("mlflow_run_id", tracker.run_id)
                tracker.log_params({"seed": self.params.seed, "trial": trial.number,
                                    **flatten(solver, "contour.solver."), **flatten(train_cfg, "tune.train."),
                                    **(flatten(inference, "contour.inference_solver.") if inference else {})})

                def on_epoch_end(epoch: int, row: dict[str, float]) -> None:
                    if twin.report(epoch, float(row[f"val_{cfg.objective}"])):
                        trial.set_user_attr("pruned_at_epoch", epoch)
                        raise optuna.TrialPruned(f"val_{cfg.objective} {row[f'val_{cfg.objective}']:.4g} after "
                                                 f"epoch {epoch}: pruned by the {cfg.pruner} pruner")

                model, spec = self._build(solver, inference)
                memory = PeakMemory(self.info.device)
                try:
                    with memory:
                        result = fit(model, self.train_set, self.val_set, train_cfg, trial_dir,
                                     seed=self.params.seed, model_spec=spec, data_id=self.data_id, info=self.info,
                                     tracker=tracker, stage="tune", on_epoch_end=on_epoch_end)
                except optuna.TrialPruned as err:
                    pruned, state = err, TrialState.PRUNED
                    tracker.set_tags({"optuna.state": "PRUNED", "nodeseg.pruned": str(err)})
                except TRIAL_FAILURES as err:
                    reason = " ".join(str(err).split()) or type(err).__name__
                    trial.set_user_attr("fail_reason", f"{type(err).__name__}: {reason}")
                    tracker.set_tags({"optuna.state": "FAIL"})
                    raise
                if pruned is None:
                    values = self._values(trial, result.history[-1], _step_means(trial_dir / "train_log.csv"),
                                          solver.adjoint, memory)
                    tracker.log_metrics(dict(zip(cfg.metric_names, values, strict=True)))
                    tracker.set_tags({"optuna.state": "COMPLETE"})
                    state = TrialState.COMPLETE
        except Terminated:  # SIGTERM: Optuna marks the trial FAIL; it is queued again and resumes from here
            terminated = True
            if cfg.retries > 0:
                retry_callback(cfg.retries)(self.study, self._frozen(trial))
            raise
        finally:
            twin.finish(state)
            if not terminated:
                shutil.rmtree(trial_dir / "checkpoints", ignore_errors=True)
        if pruned is not None:
            raise pruned
        return values

    def _values(self, trial: optuna.Trial, last: dict[str, float], steps: dict[str, float],
                adjoint: bool, memory: PeakMemory) -> tuple[float, float, float, float]:
        """(accuracy, NFE per step, seconds per step, peak memory MiB); also kept as user attributes.

        NFE per step = forward + backward evaluations. With direct backprop (adjoint off) the backward
        pass goes through each stored forward evaluation once; it is counted as ``nfe_forward`` backward
        evaluations (``solve.py`` counts 0 there) so that the two modes compare on one scale.
        """
        backward = steps["nfe_backward"] if adjoint else steps["nfe_forward"]
        nfe = steps["nfe_forward"] + backward
        accuracy = float(last[f"val_{self.cfg.objective}"])
        for key, value in {"val_iou": last["val_iou"], "val_loss": last["val_loss"], "val_nfe": last["val_nfe"],
                           "nfe_forward": steps["nfe_forward"], "nfe_backward": steps["nfe_backward"],
                           "seconds_per_step": steps["seconds"], "peak_memory_mb": memory.mb}.items():
            trial.set_user_attr(key, float(value))
        trial.set_user_attr("peak_memory_kind", memory.kind)
        return accuracy, nfe, steps["seconds"], memory.mb


def optimize(shards: Path, unet_checkpoint: Path, out: Path, params: Params, *, storage: str,
             study_name: str = DEFAULT_STUDY, n_trials: int, worker_index: int = 0) -> None:
    """Join the study and run ``n_trials`` trials in this process (sampler seed: ``seed + worker_index``)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise NodesegError("nodeseg tune runs one process per worker: start it without torchrun "
                           "(--workers N for local processes)")
    store = open_storage(storage, heartbeat_s=params.tune.heartbeat_s, retries=params.tune.retries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=params.seed + worker_index, constant_liar=True)
    study = load_study(store, study_name, sampler=sampler)
    _check_objective(study, params.tune, storage)
    # the twins are asked and told, never optimized: their storage beats no heartbeat
    pruning = load_study(storage, study_name + PRUNING_SUFFIX, pruner=make_pruner(params.tune))
    runner = TrialRunner(shards, unet_checkpoint, out, params, study, pruning)
    try:
        study.optimize(runner, n_trials=n_trials, catch=TRIAL_FAILURES, gc_after_trial=True)
    finally:
        ddp.teardown()


def _worker_main(shards: Path, unet_checkpoint: Path, out: Path, params: Params, storage: str,
                 study_name: str, n_trials: int, worker_index: int, workers: int) -> None:
    """Entry point of a spawned worker process."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {worker_index} %(levelname)s "
                                                   "%(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    try:
        with sigterm_raises():  # the parent's terminate() on SIGTERM: the trial ends FAIL and is queued again
            optimize(shards, unet_checkpoint, out, params, storage=storage, study_name=study_name,
                     n_trials=n_trials, worker_index=worker_index)
    except BaseException as err:  # the parent quotes this line when the worker's exit code is not 0
        _worker_error(out, worker_index).write_text(f"{type(err).__name__}: {' '.join(str(err).split())}"[:2000])
        raise


def _worker_error(out: Path, worker_index: int) -> Path:
    path = Path(out) / "trials" / f"worker-{worker_index}.error"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_workers(shards: Path, unet_checkpoint: Path, out: Path, params: Params, *, storage: str,
                study_name: str = DEFAULT_STUDY, n_trials: int, workers: int = 1, worker_index: int = 0) -> None:
    """Run ``n_trials`` trials in ``workers`` processes (spawned; in this one when ``workers`` is 1).

    Worker i runs ``n_trials // workers`` trials, one more when i < ``n_trials % workers``, so exactly
    ``n_trials`` are run; its sampler seed is ``seed + worker_index + i``.
    """
    if workers < 1:
        raise ConfigError(f"--workers {workers}: expected an int >= 1")
    if workers == 1:
        optimize(shards, unet_checkpoint, out, params, storage=storage, study_name=study_name,
                 n_trials=n_trials, worker_index=worker_index)
        return
    for i in range(worker_index, worker_index + workers):
        _worker_error(out, i).unlink(missing_ok=True)
    ctx = multiprocessing.get_context("spawn")
    shares = [n_trials // workers + (i < n_trials % workers) for i in range(workers)]
    procs = [ctx.Process(target=_worker_main, name=f"nodeseg-tune-{worker_index + i}",
                         args=(shards, unet_checkpoint, out, params, storage, study_name, share,
                               worker_index + i, workers))
             for i, share in enumerate(shares) if share > 0]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    bad = {i: p.exitcode for i, p in enumerate(procs, start=worker_index) if p.exitcode != 0}
    if bad:
        errors = []
        for i, code in bad.items():
            path = _worker_error(out, i)
            errors.append(f"worker {i} (exit code {code}): {path.read_text() if path.is_file() else 'no message'}")
        raise NodesegError(f"tune workers failed: {'; '.join(errors)}; their trials stay in the study")


def write_report(storage: str, out: Path, params: Params, *, study_name: str = DEFAULT_STUDY,
                 write_params: Path | None = None) -> TuneResult:
    """Tables, Pareto plots and ``choice.json`` in ``out``; the chosen solver into ``write_params``; MLflow."""
    cfg = params.tune
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = load_study(storage, study_name)
    _check_objective(study, cfg, storage)
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    chosen = choose.choose_operating_point(trials, cfg)
    pareto = {t.number for t in study.best_trials}
    rows = [report.trial_row(t, cfg, pareto, chosen.number) for t in trials]
    csv_path, md_path = report.write_tables(rows, out)
    files = {"trials_csv": csv_path, "trials_md": md_path,
             "pareto_png": report.plot_png(study, cfg, chosen, out / "pareto_front.png")}
    html = report.plot_html(study, cfg, out / "pareto_front.html")
    if html is not None:
        files["pareto_html"] = html
    solver = dict(chosen.user_attrs["solver"])
    inference = chosen.user_attrs.get("inference_solver")
    weights = dict(chosen.user_attrs.get("regularisers") or {})
    choice: dict[str, Any] = {
        "study": study_name, "storage": redact(storage), "rule": choose.rule_text(cfg), "states": states,
        "pareto": sorted(pareto), "chosen": _summary(chosen, cfg), "solver": solver,
        "inference_solver": inference, "regularisers": weights,
        "written_to": str(write_params) if write_params else None,
    }
    ref = next((t for t in trials if t.user_attrs.get("reference") and t.state == TrialState.COMPLETE), None)
    if ref is not None:
        choice["reference"] = _summary(ref, cfg)
        choice["vs_reference"] = {"nfe_ratio": chosen.values[1] / ref.values[1],
                                  "seconds_ratio": chosen.values[2] / ref.values[2],
                                  "peak_memory_ratio": chosen.values[3] / ref.values[3] if ref.values[3] else None,
                                  f"val_{cfg.objective}_difference": chosen.values[0] - ref.values[0]}
    files["choice"] = out / "choice.json"
    files["choice"].write_text(json.dumps(choice, indent=2) + "\n")
    if write_params is not None:
        choose.write_solver_params(write_params, solver, {"contour": {"inference_solver": inference},
                                                          "refine": weights})
        log.info("wrote the chosen solver (trial %d) into %s: %s", chosen.number, write_params, solver)
    _log_parent(study, choice, files)
    return TuneResult(study_name=study_name, storage=redact(storage), states=states, chosen=chosen.number,
                      solver=solver, files={k: str(v) for k, v in files.items()})


def _summary(t: FrozenTrial, cfg: TuneConfig) -> dict[str, Any]:
    keep = ("val_iou", "val_loss", "val_nfe", "nfe_forward", "nfe_backward", "peak_memory_kind",
            "inference_solver", "regularisers", "mlflow_run_id")
    return {"trial": t.number, **dict(zip(cfg.metric_names, t.values, strict=True)),
            "solver": t.user_attrs.get("solver"), **{k: t.user_attrs[k] for k in keep if k in t.user_attrs}}


def _log_parent(study: optuna.Study, choice: dict[str, Any], files: dict[str, Path]) -> None:
    """Log the report to the study's MLflow parent run (resumed by id)."""
    run_id = study.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    import mlflow

    from nodeseg import tracking

    tracking.configure()
    with mlflow.start_run(run_id=run_id):
        chosen = choice["chosen"]
        mlflow.log_metrics({f"chosen.{k}": float(v) for k, v in chosen.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.set_tags({"nodeseg.chosen_trial": chosen["trial"], "nodeseg.rule": choice["rule"],
                         **{f"nodeseg.trials.{k.lower()}": v for k, v in choice["states"].items()}})
        for path in files.values():
            mlflow.log_artifact(str(path))


def tune(shards: Path, unet_checkpoint: Path, out: Path, params: Params, *, storage: str | None = None,
         study_name: str = DEFAULT_STUDY, workers: int = 1, n_trials: int | None = None, worker_index: int = 0,
         phase: Phase = "all", write_params: Path | None = None) -> TuneResult | None:
    """Run ``phase`` of the study (``all``: create, ``workers`` processes of trials, report).

    ``storage`` defaults to ``sqlite:///<out>/study.db``; ``n_trials`` to ``tune.n_trials`` (the trials this
    call runs, split over its workers). Returns the report's result (None for ``create`` and ``optimize``).
    """
    if phase not in PHASES:
        raise ConfigError(f"--phase {phase!r}: expected one of {', '.join(PHASES)}")
    out = Path(out)
    storage = storage or default_storage(out)
    n = params.tune.n_trials if n_trials is None else n_trials
    if n < 1:
        raise ConfigError(f"--n-trials {n}: expected an int >= 1")
    if phase in ("all", "create"):
        create_study(storage, study_name, params)
    if phase in ("all", "optimize"):
        run_workers(shards, unet_checkpoint, out, params, storage=storage, study_name=study_name, n_trials=n,
                    workers=workers, worker_index=worker_index)
    if phase in ("all", "report"):
        return write_report(storage, out, params, study_name=study_name, write_params=write_params)
    return None
