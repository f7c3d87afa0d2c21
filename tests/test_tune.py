"""`nodeseg tune`: shared sqlite and journal storages, failed trials, the rule, the params round trip, MLflow."""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import mlflow
import optuna
import pytest
from committed import PARAMS
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from pipeline_params import TINY, tiny_params

from nodeseg.cli import main
from nodeseg.errors import ConfigError, NodesegError
from nodeseg.params import Params, load_params
from nodeseg.stages.generate import generate
from nodeseg.stages.preprocess import preprocess
from nodeseg.stages.pretrain import pretrain
from nodeseg.stages.refine import refine
from nodeseg.stages.select import select_checkpoint
from nodeseg.stages.tune import tune
from nodeseg.train import checkpoint as ckpt
from nodeseg.tuning import choose
from nodeseg.tuning.choose import choose_operating_point, eligible, write_solver_params
from nodeseg.tuning.config import TuneConfig
from nodeseg.tuning.pruning import EpochPruning, create_pruning_study, make_pruner
from nodeseg.tuning.storage import load_study, open_storage, redact

REPO = Path(__file__).resolve().parents[1]
FAST = ["tune.epochs=1", "tune.max_batches_per_epoch=1", "refine.batch_size=2", "refine.warmup_steps=0"]


def _params(*extra: str) -> Params:
    return tiny_params(*FAST, *extra)


@pytest.fixture(scope="module")
def selected(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """generate → preprocess → pretrain → select on tiny data, once for the module."""
    root = tmp_path_factory.mktemp("tune")
    params = tiny_params("pretrain.epochs=1")
    generate(root / "raw", params)
    preprocess(root / "raw", root / "shards", params)
    pretrain(root / "shards", root / "pretrain", params)
    select_checkpoint(root / "pretrain", root / "select", params.select)
    return {"shards": root / "shards", "unet": root / "select" / "model.pt"}


def _trial(number: int, values: list[float] | None, state: TrialState = TrialState.COMPLETE) -> optuna.trial.FrozenTrial:
    t = create_trial(params={"method": "dopri5", "atol": 1e-3},
                     distributions={"method": CategoricalDistribution(["dopri5"]),
                                    "atol": FloatDistribution(1e-6, 1e-2, log=True)},
                     values=values if state == TrialState.COMPLETE else None, state=state)
    t.number = number
    return t


def test_rule_on_synthetic_trials() -> None:
    cfg = TuneConfig(within_iou=0.005)
    trials = [_trial(0, [0.800, 30, 1.0]), _trial(1, [0.797, 20, 2.0]), _trial(2, [0.790, 10, 0.5]),
              _trial(3, [0.797, 20, 1.5]), _trial(4, None, TrialState.FAIL), _trial(5, None, TrialState.PRUNED)]
    assert [t.number for t in eligible(trials, cfg)] == [0, 1, 3]  # 0.790 is 1 IoU point below the best
    assert choose_operating_point(trials, cfg).number == 3  # 20 NFE, then fewer seconds than trial 1
    assert choose_operating_point(trials, TuneConfig(within_iou=0.0)).number == 0
    assert choose_operating_point(trials, TuneConfig(within_iou=0.02)).number == 2
    loss = TuneConfig(objective="loss", within_loss=0.05)
    by_loss = [_trial(0, [0.100, 30, 1.0]), _trial(1, [0.104, 12, 1.0]), _trial(2, [0.200, 5, 1.0])]
    assert choose_operating_point(by_loss, loss).number == 1  # within 5 % of 0.100, fewer NFE
    with pytest.raises(NodesegError, match=r"no trial completed \(1 FAIL, 1 PRUNED\)"):
        choose_operating_point(trials[4:], cfg)


def test_rule_keeps_to_the_memory_budget() -> None:
    trials = [_trial(0, [0.800, 30, 1.0, 900.0]), _trial(1, [0.799, 10, 1.0, 4000.0]),
              _trial(2, [0.798, 20, 1.0, 500.0])]
    assert choose_operating_point(trials, TuneConfig()).number == 1
    budget = TuneConfig(max_peak_memory_mb=1000.0)
    assert choose_operating_point(trials, budget).number == 2 and "1000 MiB" in choose.rule_text(budget)


def test_space_draws_steps_inference_solver_and_regulariser_weights() -> None:
    from nodeseg.solve import SolverConfig
    from nodeseg.tuning.space import reference_params, suggest_inference, suggest_regularisers, suggest_solver

    cfg = TuneConfig(methods=("dopri5", "rk4"), step_sizes=(), steps=(1, 2, 3, 4), inference_methods=("euler",),
                     kinetic_energy=(1e-4, 1e-1), jacobian_frobenius=(1e-4, 1e-1))
    study = optuna.create_study(directions=["maximize", "minimize", "minimize", "minimize"])
    study.enqueue_trial({"method": "rk4", "steps": 3, "adjoint": True, "inference": "euler", "inference_steps": 2,
                         "kinetic_energy_zero": False, "kinetic_energy": 0.0123456, "jacobian_frobenius_zero": True})
    trial = study.ask()
    solver = suggest_solver(trial, cfg, SolverConfig())
    assert (solver.method, solver.steps, solver.step_size) == ("rk4", 3, None)
    inference = suggest_inference(trial, cfg, solver)
    assert inference is not None and (inference.method, inference.steps) == ("euler", 2)
    assert suggest_regularisers(trial, cfg) == {"kinetic_energy": 0.0123, "jacobian_frobenius": 0.0}
    ref = reference_params(cfg)
    assert ref is not None and ref["inference"] == "train" and ref["kinetic_energy_zero"] is True
    with pytest.raises(ValueError, match="steps"):
        TuneConfig(steps=(2,), step_sizes=(0.5,))
    with pytest.raises(ValueError, match="inference_methods"):
        TuneConfig(steps=(), inference_methods=("rk4",))


_PEAK_SCRIPT = """
import json, torch
from nodeseg.tuning.memory import PeakMemory
out = []
for _ in range(2):  # a true per-block peak is seen again in a second block
    with PeakMemory(torch.device("cpu")) as m:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    out.append((m.kind, m.mb))
print(json.dumps(out))
"""


def test_peak_memory_sees_a_trial_allocation() -> None:
    # in a fresh process: earlier tests in this one may have tuned malloc to keep freed blocks resident, and
    # an allocation served from them raises no peak
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    for kind, mb in json.loads(done.stdout.strip().splitlines()[-1]):
        assert kind in ("rss_peak", "ru_maxrss_growth")
        if kind == "rss_peak":
            assert 60 <= mb < 200


def test_pruner_on_the_companion_study() -> None:
    storage = optuna.storages.InMemoryStorage()
    cfg = TuneConfig(pruner="percentile", prune_percentile=50.0, prune_startup_trials=1)
    create_pruning_study(storage, "s", maximize=True)
    study = optuna.load_study(study_name="s.pruning", storage=storage, pruner=make_pruner(cfg))
    first = EpochPruning(study, 0)
    assert not first.report(1, 0.9)  # no finished trial yet
    first.finish(TrialState.COMPLETE)
    assert EpochPruning(study, 1).report(1, 0.1)
    assert not EpochPruning(study, 2).report(1, 0.95)
    assert not EpochPruning(study, 3).report(1, 0.897)  # below the median, but within within_iou of 0.9
    assert EpochPruning(study, 4).report(1, float("nan"))


def test_storage_forms(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path / "a.db")), optuna.storages.RDBStorage)
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 'b.db'}"), optuna.storages.RDBStorage)
    assert isinstance(open_storage(f"journal:{tmp_path / 'j' / 'c'}"), optuna.storages.JournalStorage)
    assert isinstance(open_storage(str(tmp_path / "d.log")), optuna.storages.JournalStorage)
    with pytest.raises(ConfigError, match=r"--storage 'study\.txt': not a storage; expected one of sqlite:///"):
        open_storage("study.txt")
    assert redact("postgresql://u:secret@db:5432/optuna") == "postgresql://u:***@db:5432/optuna"
    with pytest.raises(ConfigError, match=r"study .nope. not found .* \(studies there: none\)"):
        load_study(str(tmp_path / "a.db"), "nope")
    with pytest.raises(ConfigError, match="tune: argument 'methods' must be a non-empty list"):
        load_params([PARAMS], ["tune.methods=[rk45]"])


_POP_RACE = """
import sys, time
from pathlib import Path
import optuna
from nodeseg.tuning.storage import open_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="s", storage=open_storage(sys.argv[1]))
while not Path(sys.argv[2]).exists():
    time.sleep(0.01)
for _ in range(4):
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study.tell(trial, 1.0)  # 'Cannot tell a COMPLETE trial' when two workers popped the same enqueued trial
"""


def test_sqlite_hands_each_enqueued_trial_to_one_worker(tmp_path: Path) -> None:
    """Four processes popping enqueued trials at once from one sqlite file (plain RDBStorage: 3 of 5 runs
    gave a trial to two workers)."""
    url, go = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "go"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    for i in range(16):
        study.enqueue_trial({"x": i / 16})
    procs = [subprocess.Popen([sys.executable, "-c", _POP_RACE, url, str(go)], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    time.sleep(1.0)
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert len(trials) == 16 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.params["x"] for t in trials) == [i / 16 for i in range(16)]


def _get(app: object, path: str) -> tuple[str, bytes]:
    env: dict[str, object] = {}
    setup_testing_defaults(env)
    env.update(PATH_INFO=path, REQUEST_METHOD="GET")
    status: list[str] = []
    body = b"".join(app(env, lambda s, h, e=None: status.append(s)))  # type: ignore[operator]
    return status[0], body


def test_two_workers_share_one_sqlite_storage(selected: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tune"
    result = tune(selected["shards"], selected["unet"], out, _params(), workers=2, n_trials=4)
    study = load_study(f"sqlite:///{out / 'study.db'}", "nodeseg-tune")
    states = [t.state for t in study.trials]
    assert len(states) == 4 and all(s in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED) for s in states)
    assert study.trials[0].user_attrs["reference"] is True and study.trials[0].params["atol"] == 1e-5
    assert sum(result.states.values()) == 4
    # the rule: the chosen trial is eligible and has the fewest NFE per step among the eligible ones
    cfg = _params().tune
    near = eligible(study.trials, cfg)
    chosen = study.trials[result.chosen]
    assert chosen in near and chosen.values[1] == min(t.values[1] for t in near)
    assert result.solver == chosen.user_attrs["solver"]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert all(len(t.values) == 4 and t.values[3] >= 0 and t.user_attrs["peak_memory_kind"] for t in done)
    # report files
    assert (out / "pareto_front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 5
    assert "| chosen |" in (out / "trials.md").read_text().splitlines()[0]
    choice = json.loads((out / "choice.json").read_text())
    assert choice["chosen"]["trial"] == result.chosen and "fewest NFE" in choice["rule"]
    assert choice["chosen"]["peak_memory_mb"] == chosen.values[3]
    assert choice["regularisers"] == chosen.user_attrs["regularisers"]
    assert choice["inference_solver"] == chosen.user_attrs["inference_solver"]
    header = (out / "trials.md").read_text().splitlines()[0]
    assert all(f"| {c} |" in header for c in ("peak_memory_mb", "inference", "kinetic_energy", "steps"))
    try:
        import plotly  # noqa: F401
        assert (out / "pareto_front.html").is_file()
    except ImportError:
        assert "pareto_html" not in result.files
    # every trial is an MLflow child run of the study's run
    parent = study.user_attrs["mlflow_run_id"]
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(runs["tags.optuna.trial"].astype(int)) == [0, 1, 2, 3]
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == set(runs["run_id"])
    # optuna-dashboard reads the storage
    import optuna_dashboard

    status, body = _get(optuna_dashboard.wsgi(open_storage(f"sqlite:///{out / 'study.db'}")), "/api/studies")
    assert status.startswith("200")
    names = {s["study_name"] for s in json.loads(body)["study_summaries"]}
    assert names == {"nodeseg-tune", "nodeseg-tune.pruning"}


def test_runaway_trial_fails_with_its_reason_on_a_journal(selected: dict[str, Path], tmp_path: Path) -> None:
    params = _params("tune.max_nfe=10", "tune.reference_atol=null", "tune.methods=[dopri5, rk4]",
                     "tune.adjoint=[true]", "tune.step_sizes=[0.5]", "tune.steps=[]", "tune.inference_methods=[]")
    storage, out = f"journal:{tmp_path / 'study.log'}", tmp_path / "tune"
    tune(None, None, out, params, storage=storage, phase="create")  # type: ignore[arg-type]
    study = load_study(storage, "nodeseg-tune")
    study.enqueue_trial({"method": "dopri5", "atol": 1e-3, "rtol_zero": True, "adjoint": True})  # needs 13 NFE
    study.enqueue_trial({"method": "rk4", "step_size": 0.5, "adjoint": True})  # 8 NFE per pass
    tune(selected["shards"], selected["unet"], out, params, storage=storage, phase="optimize", n_trials=2)
    failed, done = load_study(storage, "nodeseg-tune").trials
    assert failed.state == TrialState.FAIL and done.state == TrialState.COMPLETE
    assert "max_nfe exceeded" in failed.user_attrs["fail_reason"]
    assert failed.user_attrs["fail_reason"].startswith("TrainingDiverged: ")
    assert done.values[1] == 16  # 8 forward + 8 adjoint evaluations
    twins = load_study(storage, "nodeseg-tune.pruning").trials
    assert [t.state for t in twins] == [TrialState.FAIL, TrialState.COMPLETE]
    written = tmp_path / "tuned.yaml"
    result = tune(None, None, out, params, storage=storage, phase="report", write_params=written)  # type: ignore[arg-type]
    assert result is not None and result.chosen == 1 and result.states["FAIL"] == 1
    assert load_params([written]).contour.solver.method == "rk4"
    assert "max_nfe exceeded" in (out / "trials.md").read_text()


def test_cli_writes_the_tuned_solver_that_refine_reads(selected: dict[str, Path], tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    shutil.copy(PARAMS, params_file)
    sets = [*TINY, *FAST, "tune.reference_atol=null", "tune.methods=[bosh3, rk4]", "tune.step_sizes=[0.5]", "tune.steps=[]", "tune.inference_methods=[]"]
    out = tmp_path / "tune"
    argv = ["tune", "--params", str(params_file), *[a for s in sets for a in ("--set", s)], "--shards",
            str(selected["shards"]), "--unet", str(selected["unet"]), "--out", str(out), "--n-trials", "2",
            "--storage", str(tmp_path / "study.log"), "--write-params", str(params_file)]
    assert main(argv) == 0
    solver = json.loads((out / "choice.json").read_text())["solver"]
    text = params_file.read_text()
    assert "# Contour Evolution (refine)" in text and "tune:" in text  # comments and sections kept
    tuned = load_params([params_file], sets)
    assert {k: getattr(tuned.contour.solver, k) for k in solver} == solver
    refine(selected["shards"], selected["unet"], tmp_path / "refine", tuned)
    spec = ckpt.load(tmp_path / "refine" / "model.pt")["model_spec"]["solver"]
    assert {k: spec.get(k) for k in solver} == solver  # a spec leaves steps out when null


def test_write_solver_params_keeps_the_file_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    shutil.copy(PARAMS, path)
    before = path.read_text().splitlines()
    write_solver_params(path, {"method": "rk4", "atol": 1e-5, "rtol": 0.0, "step_size": 0.25, "adjoint": False})
    after = path.read_text().splitlines()
    changed = [line[2:].strip() for line in difflib.ndiff(before, after) if line.startswith(("+ ", "- "))]
    assert sorted(changed) == ["adjoint: false", "adjoint: true", "atol: 1.0e-05", "atol: 1.0e-3", "method: dopri5",
                               "method: rk4", "step_size: 0.25"]
    solver = load_params([path]).contour.solver
    assert (solver.method, solver.atol, solver.step_size, solver.adjoint) == ("rk4", 1e-5, 0.25, False)


def test_tuning_dvc_stage_lists_what_it_reads_but_not_what_it_writes() -> None:
    """tuning/dvc.yaml: every params key exists; the solver keys tune writes are not among its params (a stage
    that lists them would be stale right after writing them); refine lists `contour`, so it reruns."""
    import yaml

    from nodeseg.config import to_mapping
    from nodeseg.tuning.space import tuned_keys

    stage = yaml.safe_load((REPO / "tuning" / "dvc.yaml").read_text())["stages"]["tune"]
    written = {f"contour.solver.{k}" for k in tuned_keys(Params().contour.solver)}
    written |= {"contour.inference_solver", "refine.kinetic_energy", "refine.jacobian_frobenius"}
    for key in stage["params"]:
        node = to_mapping(Params())
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, key
            node = node[part]
        assert not any(w == key or w.startswith(key + ".") for w in written), key
    assert "--write-params params.yaml" in stage["cmd"] and stage["wdir"] == ".."
    refine = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["refine"]
    assert "contour" in refine["params"] and "tune" not in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("phase", ["create", "optimize", "report"])
def test_every_phase_refuses_a_study_of_another_objective(tmp_path: Path, phase: str) -> None:
    """A worker or report with tune.objective=loss on an IoU study (maximize, minimize, minimize) stops before
    it touches data, instead of feeding val_loss into a maximised objective."""
    storage, out = f"journal:{tmp_path / 'study.log'}", tmp_path / "tune"
    tune(None, None, out, _params("tune.reference_atol=null"), storage=storage, phase="create")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"has directions \['maximize', 'minimize', 'minimize', 'minimize'\] \(objective "
                                          r"'iou'\), but tune.objective='loss' needs"):
        tune(tmp_path / "no-shards", tmp_path / "no-unet", out, _params("tune.objective=loss"),
             storage=storage, phase=phase, n_trials=1)


# ----------------------------------------------------------------------------------------------- workers that stop

RESILIENT = [*TINY, "refine.batch_size=2", "refine.warmup_steps=0", "tune.epochs=3", "tune.max_batches_per_epoch=3",
             "tune.reference_atol=null", "tune.methods=[rk4]", "tune.step_sizes=[0.5]", "tune.steps=[]", "tune.inference_methods=[]", "tune.adjoint=[true]",
             "tune.pruner=none", "tune.heartbeat_s=1", "tune.retries=2"]


def _worker(selected: dict[str, Path], out: Path, storage: str, workers: int = 1, *extra: str
            ) -> subprocess.Popen[bytes]:
    """``nodeseg tune --phase optimize`` of one trial per worker, as its own process (the session's MLflow
    store)."""
    argv = [sys.executable, "-m", "nodeseg", "tune", "--params", str(PARAMS),
            *[a for s in (*RESILIENT, *extra) for a in ("--set", s)], "--shards", str(selected["shards"]),
            "--unet", str(selected["unet"]), "--out", str(out), "--storage", storage, "--phase", "optimize",
            "--n-trials", str(workers), "--workers", str(workers)]
    return subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _stop_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], sig: signal.Signals) -> tuple[int, str]:
    """Send ``sig`` as soon as ``ready()``; the exit status and the last stderr line."""
    deadline = time.monotonic() + 180
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, (err.decode().strip().splitlines() or [""])[-1]


@pytest.mark.slow
def test_a_killed_or_stopped_workers_trial_runs_again_from_its_checkpoints(
    selected: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL (a lost node): the trial's heartbeat stops; the next worker marks it FAIL and runs it again.
    SIGTERM (a deleted pod): the trial ends FAIL, is queued again at once and keeps its checkpoints, from
    which the rerun resumes. No MLflow run or pruning twin is left RUNNING."""
    params = tiny_params(*RESILIENT[len(TINY):])
    out, storage = tmp_path / "tune", f"sqlite:///{tmp_path / 'study.db'}"
    tune(None, None, out, params, storage=storage, phase="create")  # type: ignore[arg-type]

    def trials() -> list[optuna.trial.FrozenTrial]:
        return load_study(storage, "nodeseg-tune").trials

    # 1. SIGKILL during trial 0's first epoch, once its MLflow run exists: the trial stays RUNNING
    code, _ = _stop_when(_worker(selected, out, storage),
                         lambda: bool(trials() and "mlflow_run_id" in trials()[0].user_attrs), signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (out / "trials/trial-0000/checkpoints/epoch-0001.pt").exists()  # killed before any checkpoint
    assert [t.state for t in trials()] == [TrialState.RUNNING]

    # 2. once its heartbeat is 2 s old, the next worker fails it and runs it again as trial 1 (from the start,
    # there is no checkpoint); SIGTERM once trial 1 wrote epoch 1: one line, exit 143, trial 2 waits
    time.sleep(2.5)
    code, last = _stop_when(_worker(selected, out, storage),
                            (out / "trials/trial-0001/checkpoints/epoch-0001.pt").exists, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and last == "nodeseg tune: stopped by SIGTERM", last
    assert [t.state for t in trials()] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]
    assert (out / "trials/trial-0001/checkpoints/epoch-0001.pt").is_file()  # kept for the rerun

    # 3. the rerun takes over trial 1's folder and resumes from its checkpoints
    caplog.set_level(logging.INFO, logger="nodeseg")
    tune(selected["shards"], selected["unet"], out, params, storage=storage, phase="optimize", n_trials=1)
    done = trials()
    assert [t.state for t in done] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert done[1].params == done[0].params == done[2].params
    assert (done[1].user_attrs["retry_of"], done[2].user_attrs["retry_of"]) == (0, 1)
    resumed = re.search(r"resuming tune from \S+/trial-0002/checkpoints/epoch-(\d{4})\.pt", caplog.text)
    assert resumed and int(resumed[1]) >= 1, caplog.text
    assert not (out / "trials/trial-0001").exists() and not (out / "trials/trial-0002/checkpoints").exists()
    # MLflow: the killed trial's run was closed by its rerun, the stopped one ended KILLED by itself
    client = mlflow.MlflowClient()
    runs = [client.get_run(t.user_attrs["mlflow_run_id"]) for t in done]
    assert [r.info.status for r in runs] == ["KILLED", "KILLED", "FINISHED"]
    assert runs[0].data.tags["nodeseg.restarted_as"] == runs[1].info.run_id
    assert runs[1].data.tags["nodeseg.error"] == "stopped by SIGTERM"
    twins = load_study(storage, "nodeseg-tune.pruning").trials
    assert [t.state for t in twins] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.slow
def test_sigterm_to_the_parent_stops_every_worker_cleanly(selected: dict[str, Path], tmp_path: Path) -> None:
    """The parent of --workers 2 passes SIGTERM on; each worker's trial ends FAIL, its MLflow run KILLED, and
    is queued again."""
    longer = "tune.epochs=8"  # both trials under way at once, whatever the two workers' start-up times
    params = tiny_params(*RESILIENT[len(TINY):], longer)
    out, storage = tmp_path / "tune", f"sqlite:///{tmp_path / 'study.db'}"
    tune(None, None, out, params, storage=storage, phase="create")  # type: ignore[arg-type]

    def both_running() -> bool:
        trials = load_study(storage, "nodeseg-tune").trials
        return len(trials) == 2 and all("mlflow_run_id" in t.user_attrs for t in trials)

    code, last = _stop_when(_worker(selected, out, storage, 2, longer), both_running, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and last == "nodeseg tune: stopped by SIGTERM", last
    trials = load_study(storage, "nodeseg-tune").trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.WAITING] * 2
    assert sorted(str(t.params) for t in trials[:2]) == sorted(str(t.params) for t in trials[2:])
    client = mlflow.MlflowClient()
    for t in trials[:2]:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["nodeseg.error"] == "stopped by SIGTERM"
