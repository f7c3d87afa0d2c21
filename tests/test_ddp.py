"""DDP with real ``torchrun`` processes (gloo on 127.0.0.1): ranks end identical, data-parallel training on a
global batch equals one process on the same batch, and a job stopped by SIGTERM resumes to the same weights.

Every run goes through ``tests/ddp_driver.py``, which runs ``nodeseg.cli.main`` (what ``python -m nodeseg``
runs) and dumps each rank's trained model, so ranks can be compared. Shards, params and the selected UNet
are made once for the module from the tiny params of ``tests/pipeline_params.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from committed import PARAMS
from pipeline_params import TINY, tiny_params

from nodeseg.stages.generate import generate
from nodeseg.stages.preprocess import preprocess
from nodeseg.stages.pretrain import pretrain
from nodeseg.stages.select import select_checkpoint
from nodeseg.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("ddp_driver.py")
TIMEOUT_S = 120  # per process; each test finishes well inside a minute on two cores

# Pretrain: 2 epochs x 3 steps of a global batch of 4, augmentation on (it is drawn per sample index and
# epoch, so it does not depend on the rank a sample lands on).
PRETRAIN = ["pretrain.epochs=2", "pretrain.batch_size=4", "pretrain.max_batches_per_epoch=3",
            "pretrain.warmup_steps=2", "pretrain.val_batch_size=8"]
# The plain comparison with one process runs without augmentation; scale augmentation pads (valid = 0), and
# test_augmented_padding_weighs_ranks_like_one_process checks that the loss stays the global batch's mean.
EXACT = [*PRETRAIN, "pretrain.augment.enabled=false"]
# Refine: dopri5 (adaptive: NFE depends on each rank's samples), 1 epoch x 2 steps of a global batch of 4.
REFINE = ["refine.epochs=1", "refine.batch_size=4", "refine.max_batches_per_epoch=2", "refine.val_batch_size=8",
          "contour.solver.method=dopri5", "contour.solver.adjoint=true"]

# DDP averages the ranks' gradients of their half-batch means (an all-reduce sum, then / world size); one
# process takes the gradient of the mean over the whole batch. Same value, another float32 summation order:
# ~1e-7 relative per step, which Adam (g / sqrt(v)) and 6 steps amplify. Measured max |diff| with parameters
# of size ~0.1-1: ~1e-6 in NCHW; 2.2e-5 with channels_last (the training default) for 4 ranks of batch 1, whose
# oneDNN kernels sum in another order than one process of batch 4. The tolerance leaves a margin of ~3x and is
# 2 % of one Adam step (lr 3e-3): a rank whose gradient were lost or mis-weighted would miss it by ~100x.
RTOL, ATOL = 1e-4, 6e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(mlruns: Path) -> dict[str, str]:
    """One torch thread, no inherited rank variables, and an MLflow file store of this job's own (rank 0
    logs; a store per job keeps concurrent jobs from locking one sqlite file, and needs no migrations)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MLFLOW_TRACKING_URI": mlruns.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_REGISTRY_URI"):
        env.pop(name, None)
    return env


def _torchrun(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *flags, "--max-restarts=0"]


def _run(jobs: dict[str, list[list[str]]], cwd: Path, **env: str) -> None:
    """Start every command of every job at once (a job: the torchrun agents of one run), wait for all, fail
    with their output."""
    cmds = [(c, {**_env(cwd / f"mlruns-{name}"), **env}) for name, job in jobs.items() for c in job]
    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c, env in cmds]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(procs), "\n\n".join(
        f"$ {' '.join(c)}\n{o[-4000:]}" for (c, _), o in zip(cmds, outputs, strict=True))


def _stage(stage: str, dump: Path, *args: str, extra: list[str]) -> list[str]:
    sets = [a for s in [*TINY, *extra] for a in ("--set", s)]
    return [str(DRIVER), str(dump), "--", stage, "--params", str(PARAMS), *args, *sets]


def _dumps(dump: Path, world: int) -> list[dict]:
    return [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max |diff| {(a[k].float() - b[k].float()).abs().max():.3g}"


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny shards and a selected UNet (one process, in this one)."""
    root = tmp_path_factory.mktemp("ddp")
    params = tiny_params(*PRETRAIN)
    generate(root / "raw", params)
    preprocess(root / "raw", root / "shards", params)
    pretrain(root / "shards", root / "pretrain", params)
    select_checkpoint(root / "pretrain", root / "select", params.select)
    return {"root": root, "shards": root / "shards", "unet": root / "select" / "model.pt"}


def test_two_processes_end_with_identical_weights(data: dict[str, Path], tmp_path: Path) -> None:
    """torchrun --nproc-per-node=2 nodeseg pretrain: both ranks hold the same weights, and rank 0's last
    checkpoint holds them too."""
    dump, out = tmp_path / "dump", tmp_path / "run"
    _run({"ddp": [_torchrun("--standalone", "--nproc-per-node=2")
                  + _stage("pretrain", dump, "--shards", str(data["shards"]), "--out", str(out), extra=PRETRAIN)]},
         tmp_path)
    ranks = _dumps(dump, 2)
    assert [r["world_size"] for r in ranks] == [2, 2]
    _assert_identical(ranks[0]["state"], ranks[1]["state"])
    epochs = [e for e, _ in ckpt.list_checkpoints(out / "checkpoints")]
    assert epochs == [1, 2]
    _assert_identical(ckpt.load(out / "checkpoints" / "epoch-0002.pt")["model"], ranks[0]["state"])
    assert not list(out.glob("*/rank*")), "only rank 0 writes"


@pytest.mark.parametrize(("nproc", "balance"), [(1, 100), (2, 100), (2, 0)], ids=["2x1", "2x2", "2x2-plain-loss"])
def test_two_nodes_equal_one_process_on_the_global_batch(data: dict[str, Path], tmp_path: Path, nproc: int,
                                                         balance: int) -> None:
    """Two torchrun agents (two 'nodes', c10d rendezvous on 127.0.0.1) of ``nproc`` processes each train the
    UNet as one process does on the same global batch (within RTOL/ATOL: summation order), with the
    class-balanced loss (its means taken over the global batch's object and background pixels) and without."""
    port, run_id = _free_port(), f"nodeseg-{uuid.uuid4().hex[:8]}"
    world = 2 * nproc
    extra = [*EXACT, f"pretrain.class_balance_steps={balance}"]
    agents = [
        _torchrun("--nnodes=2", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}")
        + _stage("pretrain", tmp_path / "ddp", "--shards", str(data["shards"]), "--out",
                 str(tmp_path / "ddp-run"), extra=extra)
        for _ in range(2)
    ]
    single = [sys.executable, *_stage("pretrain", tmp_path / "single", "--shards", str(data["shards"]), "--out",
                                      str(tmp_path / "single-run"), extra=extra)]
    _run({"ddp": agents, "single": [single]}, tmp_path)
    ranks = _dumps(tmp_path / "ddp", world)
    reference = _dumps(tmp_path / "single", 1)[0]
    assert [r["world_size"] for r in ranks] == [world] * world and reference["world_size"] == 1
    for r in ranks[1:]:
        _assert_identical(ranks[0]["state"], r["state"])
    diff = _max_diff(ranks[0]["state"], reference["state"])
    print(f"{world} ranks vs one process after 6 steps: max |diff| {diff:.3g}")
    for k, v in reference["state"].items():
        torch.testing.assert_close(ranks[0]["state"][k], v, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
    # the training itself moved the weights far more than the tolerance
    start = ckpt.load(tmp_path / "single-run" / "checkpoints" / "epoch-0001.pt")["model"]
    assert _max_diff(start, reference["state"]) > 15 * ATOL


def test_neural_ode_ranks_end_identical_although_their_nfe_differs(data: dict[str, Path], tmp_path: Path) -> None:
    """nodeseg refine (Contour Evolution, dopri5 with the adjoint) on 2 processes whose solvers take different
    numbers of steps: the gradients are still all-reduced once per step and both ranks end with the same
    weights. On tiny data both ranks' dopri5 happen to take the same steps, so rank 1 gets the automatic
    first step (44 evaluations from a zero-initialised f, against 13 with first_step 0.5: DESIGN.md)."""
    dump, out = tmp_path / "dump", tmp_path / "refine"
    _run({"ddp": [_torchrun("--standalone", "--nproc-per-node=2")
                  + _stage("refine", dump, "--shards", str(data["shards"]), "--unet", str(data["unet"]), "--out",
                           str(out), extra=REFINE)]}, tmp_path, RANK1_SOLVER='{"first_step": null}')
    ranks = _dumps(dump, 2)
    nfe = [r["nfe"] for r in ranks]
    print(f"NFE per training step: rank 0 {nfe[0]}, rank 1 {nfe[1]}")
    assert all(len(n) == 2 and min(n) > 0 for n in nfe), nfe
    assert nfe[0] != nfe[1]
    _assert_identical(ranks[0]["state"], ranks[1]["state"])
    start = ckpt.load(data["unet"])["model"]  # the frozen UNet is unchanged, the ODE function trained
    assert all(torch.equal(ranks[0]["state"][f"unet.{k}"], v) for k, v in start.items())
    assert (out / "model.pt").is_file()


def test_augmented_padding_weighs_ranks_like_one_process(data: dict[str, Path], tmp_path: Path) -> None:
    """The same comparison as above with the default augmentation, whose scaling pads some samples: the ranks'
    valid-pixel counts differ, and the loss must still be the global batch's mean over its valid pixels (the
    per-rank mean that DDP would average instead was off by ~1e-2 here)."""
    ddp = _torchrun("--standalone", "--nproc-per-node=2") + _stage(
        "pretrain", tmp_path / "ddp", "--shards", str(data["shards"]), "--out", str(tmp_path / "ddp-run"),
        extra=PRETRAIN)
    single = [sys.executable, *_stage("pretrain", tmp_path / "single", "--shards", str(data["shards"]), "--out",
                                      str(tmp_path / "single-run"), extra=PRETRAIN)]
    _run({"ddp": [ddp], "single": [single]}, tmp_path)
    ranks, reference = _dumps(tmp_path / "ddp", 2), _dumps(tmp_path / "single", 1)[0]
    print(f"with augmentation, 2 ranks vs one process: max |diff| {_max_diff(ranks[0]['state'], reference['state']):.3g}")
    for k, v in reference["state"].items():
        torch.testing.assert_close(ranks[0]["state"][k], v, rtol=RTOL, atol=ATOL)


def test_s3_output_under_torchrun_is_published_by_rank_0_only(data: dict[str, Path], tmp_path: Path,
                                                              bucket: str) -> None:
    """Ranks other than 0 write nothing; only rank 0 uploads, and the run folder appears complete on S3."""
    import boto3

    cmd = _torchrun("--standalone", "--nproc-per-node=2") + [
        "-m", "nodeseg", "pretrain", "--params", str(PARAMS), "--shards", str(data["shards"]),
        "--out", f"s3://{bucket}/runs/pretrain", *[a for s in [*TINY, *PRETRAIN] for a in ("--set", s)]]
    _run({"s3": [cmd]}, tmp_path)
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]}
    assert {"runs/pretrain/_SUCCESS", "runs/pretrain/checkpoints/epoch-0002.pt",
            "runs/pretrain/val_log.csv"} <= keys


def test_sigterm_to_torchrun_stops_every_rank_and_the_job_resumes(data: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A deleted or preempted pod: torchrun passes SIGTERM on to its processes, which unwind (rank 0 ends its
    MLflow run KILLED; the checkpoints stay); a new torchrun resumes to the uninterrupted job's weights."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the job's store here

    extra = [*EXACT, "pretrain.epochs=6"]
    reference, dump, out = tmp_path / "reference", tmp_path / "dump", tmp_path / "run"

    def job(target: Path, dumps: Path) -> list[str]:
        return _torchrun("--standalone", "--nproc-per-node=2") + _stage(
            "pretrain", dumps, "--shards", str(data["shards"]), "--out", str(target), extra=extra)

    _run({"reference": [job(reference, tmp_path / "reference-dump")]}, tmp_path)
    env = _env(tmp_path / "mlruns-terminated")
    proc = subprocess.Popen(job(out, dump), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        first = ckpt.checkpoint_path(out / "checkpoints", 1)
        deadline = time.monotonic() + TIMEOUT_S
        while not first.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=TIMEOUT_S)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert output.count("nodeseg pretrain: stopped by SIGTERM; run the same command again") == 2, output[-4000:]
    kept = [e for e, _ in ckpt.list_checkpoints(out / "checkpoints")]
    assert 1 <= len(kept) < 6 and kept == list(range(1, len(kept) + 1))
    client = MlflowClient((tmp_path / "mlruns-terminated").as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED" and run.data.tags["nodeseg.error"] == "stopped by SIGTERM"

    _run({"terminated": [job(out, dump)]}, tmp_path)  # the same command again
    resumed = ckpt.load(ckpt.checkpoint_path(out / "checkpoints", 6))
    _assert_identical(resumed["model"], ckpt.load(ckpt.checkpoint_path(reference / "checkpoints", 6))["model"])
    runs = {r.info.status: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert set(runs) == {"KILLED", "FINISHED"}
    assert runs["FINISHED"].data.tags["nodeseg.resumes_run"] == run.info.run_id
