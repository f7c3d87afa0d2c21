"""Faults, through the real CLI: training SIGKILLed at any point resumes to the uninterrupted run's exact weights
(and MLflow history, no run left RUNNING); SIGTERM stops a stage cleanly, uploading an S3 run's checkpoints;
an S3 endpoint that fails mid-upload publishes nothing and the stage fails clearly after retries; a runaway ODE
solve or a NaN loss stops with one line and keeps the last good checkpoint.

One torch thread everywhere (conftest sets it here; the subprocesses get OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from committed import PARAMS
from mlflow import MlflowClient
from pipeline_params import REPO, TINY
from test_storage import FaultProxy
from test_storage import proxy as proxy  # noqa: F401  (its fixture, reused)

from nodeseg.cli import main
from nodeseg.params import Params, load_params
from nodeseg.stages.generate import generate
from nodeseg.stages.preprocess import preprocess
from nodeseg.stages.pretrain import pretrain
from nodeseg.stages.refine import refine
from nodeseg.stages.select import select_checkpoint
from nodeseg.storage import MARKER
from nodeseg.train import checkpoint as ckpt

pytest_plugins = ["s3_server"]  # fixtures: moto_endpoint (one per session), s3_env, bucket

EPOCHS = 6
# 18 steps of ~10 ms per epoch; on the CPU, where one thread makes every kernel deterministic
SETS = [*TINY, "device=cpu", f"pretrain.epochs={EPOCHS}", "pretrain.batch_size=2"]
ARGS = ["--params", str(PARAMS), *[a for s in SETS for a in ("--set", s)]]
DOC = REPO / "docs" / "errors.md"  # its "Training faults" table shows these messages
PROGRESS = re.compile(r"pretrain epoch (\d+)/\d+:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")

# Runs `nodeseg`, but when the checkpoint named by $NODESEG_TEST_TEAR has been written to its temporary file,
# cuts that file in half and SIGKILLs itself before the rename: the state a kill in the middle of the write leaves.
TEAR = """
import os, signal, sys
from pathlib import Path
target, real = os.environ["NODESEG_TEST_TEAR"], os.replace
def replace(src, dst, *args, **kwargs):
    if Path(dst).name == target:
        os.truncate(src, os.path.getsize(src) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *args, **kwargs)
os.replace = replace
from nodeseg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _params() -> Params:
    return load_params([PARAMS], SETS)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny phantom shards and the uninterrupted pretrain run (in this process), once for the module."""
    root = tmp_path_factory.mktemp("faults")
    params = _params()
    generate(root / "raw", params)
    preprocess(root / "raw", root / "shards", params)
    pretrain(root / "shards", root / "baseline", params)
    return {"root": root, "raw": root / "raw", "shards": root / "shards", "baseline": root / "baseline"}


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _last_line(err: str) -> str:
    return err.splitlines()[-1]  # splitlines also splits on the \r of a cleared progress bar


# ----------------------------------------------------------------------------------------------- SIGKILL and resume


class Proc:
    """A ``nodeseg`` subprocess whose stderr (progress bars included) is collected as it arrives."""

    def __init__(self, argv: list[str], cwd: Path, tear: str | None = None) -> None:
        head = [sys.executable, "-c", TEAR] if tear else [sys.executable, "-m", "nodeseg"]
        # MLflow: a throwaway file store, quicker to open than sqlite, and it keeps the runs the kills leave
        # RUNNING out of the session's store
        env = _env(MLFLOW_TRACKING_URI=(cwd / "mlruns-killed").as_uri(), MLFLOW_ALLOW_FILE_STORE="true",
                   **({"NODESEG_TEST_TEAR": tear} if tear else {}))
        self.p = subprocess.Popen([*head, *argv], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        self.text = ""
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stderr is not None
        while chunk := self.p.stderr.read1(1 << 16):
            with self._cond:
                self.text += chunk.decode(errors="replace")
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, seen: Callable[[str], bool], timeout: float = 120.0) -> bool:
        """Block until ``seen(stderr so far)`` or the process ended; whether it was seen."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not seen(self.text):
                if self.p.poll() is not None and not self._reader.is_alive():
                    return False
                if not self._cond.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic()))):
                    assert time.monotonic() < deadline, f"timed out; stderr so far:\n{self.text[-2000:]}"
            return True

    def kill(self) -> int:
        """SIGKILL (if still running); the exit status."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        return self.finish()

    def finish(self, timeout: float = 300.0) -> int:
        rc = self.p.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc


def _latest(ckpts: Path) -> int:
    found = ckpt.list_checkpoints(ckpts)
    return found[-1][0] if found else 0


def _progress(epoch: int, lo: int, hi: int) -> Callable[[str], bool]:
    """Seen once the progress bar of ``epoch`` shows between ``lo`` and ``hi`` finished steps."""
    return lambda text: any(int(m[0]) == epoch and lo <= int(m[1]) <= hi for m in PROGRESS.findall(text))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def _assert_same_state(a: object, b: object, where: str) -> None:
    """Nested dicts/lists of tensors and numbers, equal bit for bit (timings excepted)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            if k != "seconds":
                _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _killed_store(root: Path) -> str:
    """The MLflow store of the subprocesses this module kills (a file store; see :class:`Proc`)."""
    return (root / "mlruns-killed").as_uri()


@contextlib.contextmanager
def _in_store(uri: str) -> Iterator[None]:
    """MLflow tracking in ``uri`` for the block (the CLI reads the environment); the session's store after."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            yield
        finally:
            mp.undo()
            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


def _runs(client: MlflowClient, stage: str) -> list[Any]:
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`nodeseg.stage` = '{stage}'", order_by=["attributes.start_time"])


def _assert_same_history(client: MlflowClient, run_id: str, ref_client: MlflowClient, ref_id: str) -> None:
    """Every metric of ``run_id`` logged at the same steps with the same values as in ``ref_id`` (timings
    excepted)."""
    keys = {k for k in ref_client.get_run(ref_id).data.metrics if "seconds" not in k}
    assert {k for k in client.get_run(run_id).data.metrics if "seconds" not in k} == keys
    assert {"val_loss", "train/loss"} <= keys
    for key in sorted(keys):
        got = [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        want = [(m.step, m.value) for m in sorted(ref_client.get_metric_history(ref_id, key), key=lambda m: m.step)]
        assert got == want, key


@pytest.mark.slow
def test_sigkill_anywhere_resumes_to_the_uninterrupted_weights(
    data: dict[str, Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the processes' store (see Proc)
    root = data["root"]
    out = root / "killed"
    ckpts = out / "checkpoints"
    argv = ["pretrain", *ARGS, "--shards", str(data["shards"]), "--out", str(out)]
    steps = len(_rows(data["baseline"] / "train_log.csv")) // EPOCHS
    events: list[str] = []

    def start(tear: str | None = None) -> tuple[Proc, int]:
        latest = _latest(ckpts)
        return Proc(argv, root, tear), latest

    def state() -> str:
        """Check what a kill left, and say it: complete checkpoints only, the CSV log at most one epoch behind."""
        found = ckpt.list_checkpoints(ckpts)
        for epoch, path in found:
            assert torch.load(path, map_location="cpu", weights_only=True)["epoch"] == epoch
        latest = found[-1][0] if found else 0
        logged = len(_rows(out / "val_log.csv")) if (out / "val_log.csv").exists() else 0
        assert latest - 1 <= logged <= latest  # written right after the checkpoint; rewritten on resume
        return f"checkpoints 1-{latest}, val_log.csv {logged} rows"

    def resumed(proc: Proc, latest: int) -> None:
        if latest:  # every restart picks up the newest complete checkpoint
            assert f"resuming pretrain from {ckpt.checkpoint_path(ckpts, latest)} (epoch {latest})" in proc.text

    # 1. as soon as the first checkpoint appears (the loop is then writing the CSV logs)
    proc, latest = start()
    deadline = time.monotonic() + 120
    while not ckpt.checkpoint_path(ckpts, 1).exists():
        assert proc.p.poll() is None and time.monotonic() < deadline, proc.text[-2000:]
        time.sleep(0.002)
    assert proc.kill() == -signal.SIGKILL
    events.append(f"killed as epoch-0001.pt appeared: {state()}")

    # 2. in the middle of an epoch: the second epoch this process trains, 3 to 10 of its steps done
    for _attempt in range(3):
        proc, latest = start()
        target = latest + 2
        assert proc.wait_for(_progress(target, 3, steps - 8)), proc.text[-2000:]
        assert proc.kill() == -signal.SIGKILL
        resumed(proc, latest)
        if not ckpt.checkpoint_path(ckpts, target).exists():
            events.append(f"resumed at epoch {latest}, killed mid-epoch {target}: {state()}")
            break
        events.append(f"resumed at epoch {latest}, the kill landed after epoch {target} ended; again")
    else:
        pytest.fail("three kills aimed mid-epoch all landed after the epoch ended")

    # 3. inside a checkpoint write: the temporary file half written, the rename never done
    proc, latest = start(tear=ckpt.checkpoint_path(ckpts, _latest(ckpts) + 1).name)
    assert proc.finish() == -signal.SIGKILL
    resumed(proc, latest)
    torn = sorted(ckpts.glob(f".epoch-{latest + 1:04d}.pt.*.tmp"))
    assert len(torn) == 1 and not ckpt.checkpoint_path(ckpts, latest + 1).exists()
    events.append(f"resumed at epoch {latest}, killed inside the write of epoch-{latest + 1:04d}.pt: "
                  f"{torn[0].name} left half written, {state()}")

    # 4. at a random moment (fixed seed) after training started
    delay = random.Random(11).uniform(0.0, 1.5)
    proc, latest = start()
    assert proc.wait_for(lambda text: PROGRESS.search(text) is not None)
    time.sleep(delay)
    rc = proc.kill()
    resumed(proc, latest)
    events.append(f"resumed at epoch {latest}, killed {delay:.2f} s into training (exit {rc}): {state()}")

    # 5. to the end (in this process: the same `nodeseg pretrain`, without another interpreter start), in the
    # killed processes' MLflow store
    latest = _latest(ckpts)
    caplog.set_level(logging.INFO, logger="nodeseg.train.loop")
    with _in_store(_killed_store(root)):
        assert main(argv) == 0
    assert f"resuming pretrain from {ckpt.checkpoint_path(ckpts, latest)} (epoch {latest})" in caplog.text
    events.append(f"resumed at epoch {latest}, finished: {state()}")
    print("\n".join(events))

    # nothing corrupt: epochs 1..N, each loads with weights_only=True; the torn temp file was never taken for a
    # checkpoint, and the next start removed it
    assert [e for e, _ in ckpt.list_checkpoints(ckpts)] == list(range(1, EPOCHS + 1))
    assert {p.name for p in ckpts.iterdir()} == {f"epoch-{e:04d}.pt" for e in range(1, EPOCHS + 1)}
    fingerprints = set()
    for epoch, path in ckpt.list_checkpoints(ckpts):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        assert payload["format"] == ckpt.FORMAT and payload["epoch"] == epoch
        fingerprints.add(payload["fingerprint"])
    assert len(fingerprints) == 1 and not (ckpts / "superseded").exists()  # one run throughout

    # the logs tell the same story as the uninterrupted run: each epoch and step once, the same numbers
    base = data["baseline"]
    assert [r["epoch"] for r in _rows(out / "val_log.csv")] == [str(e) for e in range(1, EPOCHS + 1)]
    assert _rows(out / "val_log.csv") == _rows(base / "val_log.csv")
    assert _rows(out / "train_log.csv") == _rows(base / "train_log.csv")

    # bit-identical to the uninterrupted run: one thread, deterministic CPU kernels, the data order and the
    # augmentation draws depend only on (seed, epoch, index), and every RNG state is restored from the checkpoint
    final = ckpt.load(ckpt.checkpoint_path(ckpts, EPOCHS))
    reference = ckpt.load(ckpt.checkpoint_path(base / "checkpoints", EPOCHS))
    for key in ("model", "optimizer", "warmup", "plateau", "history", "val_head", "fingerprint"):
        _assert_same_state(final[key], reference[key], key)

    # MLflow: no run is left RUNNING by the killed processes (each was found by a later one and marked KILLED),
    # and the finished run holds the whole metric history, each step once, as the uninterrupted run's
    store = MlflowClient(_killed_store(root))
    runs = _runs(store, "pretrain")
    assert len(runs) == len(events)  # one per process
    status = {r.info.run_id: r.info.status for r in runs}
    assert sorted(status.values()) == ["FINISHED"] + ["KILLED"] * (len(runs) - 1), status
    (finished,) = [r for r in runs if r.info.status == "FINISHED"]
    assert finished.info.run_id == final["mlflow_run_id"]
    for run in runs:
        if run is not finished:
            assert run.data.tags["nodeseg.restarted_as"] in status  # closed by a later process of this folder
    _assert_same_history(store, finished.info.run_id, MlflowClient(os.environ["MLFLOW_TRACKING_URI"]),
                         reference["mlflow_run_id"])


@pytest.mark.slow
def test_sigterm_ends_the_run_uploads_the_checkpoints_and_resumes(
    data: dict[str, Path], bucket: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deleted or preempted pod gets SIGTERM: the stage unwinds, says so in one line, ends its MLflow run as
    KILLED and (an s3:// training output) uploads its checkpoints; the same command resumes from them."""
    root = data["root"] / "sigterm"  # the processes' MLflow store goes here, apart from the SIGKILL test's
    root.mkdir()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the processes' store (see Proc)
    uri = f"s3://{bucket}/terminated"
    argv = ["pretrain", *ARGS, "--shards", str(data["shards"]), "--out", uri]
    steps = len(_rows(data["baseline"] / "train_log.csv")) // EPOCHS
    proc = Proc(argv, root)
    # the first checkpoint is written (its log line follows the write) and the second epoch is under way
    assert proc.wait_for(lambda text: "pretrain epoch 1: val_loss" in text and _progress(2, 3, steps - 8)(text))
    proc.p.send_signal(signal.SIGTERM)
    assert proc.finish() == 128 + signal.SIGTERM
    assert _last_line(proc.text) == ("nodeseg pretrain: stopped by SIGTERM; run the same command again to resume "
                                     "from the last checkpoint")
    assert _last_line(proc.text) in DOC.read_text()
    s3 = _direct()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="terminated/").get("Contents", [])}
    assert {"terminated/checkpoints/epoch-0001.pt", f"terminated/{MARKER}"} <= keys, keys
    assert not [k for k in keys if k.endswith(".tmp")], keys
    (run,) = [r for r in _runs(MlflowClient(_killed_store(root)), "pretrain")
              if r.data.tags.get("nodeseg.error") == "stopped by SIGTERM"]
    assert run.info.status == "KILLED"

    caplog.set_level(logging.INFO, logger="nodeseg.train.loop")
    with _in_store(_killed_store(root)):
        assert main(argv) == 0
    assert re.search(r"resuming pretrain from \S+epoch-000[1-9]\.pt \(epoch [1-9]\)", caplog.text), caplog.text
    final = root / "terminated-final.pt"
    s3.download_file(bucket, f"terminated/checkpoints/epoch-{EPOCHS:04d}.pt", str(final))
    final_state = ckpt.load(final)
    reference = ckpt.load(ckpt.checkpoint_path(data["baseline"] / "checkpoints", EPOCHS))
    for key in ("model", "optimizer", "history", "fingerprint"):
        _assert_same_state(final_state[key], reference[key], key)
    resumed = MlflowClient(_killed_store(root)).get_run(final_state["mlflow_run_id"])
    assert resumed.info.status == "FINISHED" and resumed.data.tags["nodeseg.resumes_run"] == run.info.run_id
    assert run.info.status == "KILLED"  # ended by itself: the resumed run had nothing to close


# ----------------------------------------------------------------------------------------------- S3 faults

S3_ENV = {"AWS_MAX_ATTEMPTS": "2", "NODESEG_S3_BACKOFF_BASE": "0.05", "NODESEG_S3_BACKOFF_MAX": "0.2",
          "NODESEG_S3_CONNECT_TIMEOUT": "2", "NODESEG_S3_READ_TIMEOUT": "10"}


def _direct() -> object:
    """A client that goes straight to moto (the stage's requests go through the proxy)."""
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


@pytest.mark.slow
def test_s3_upload_failing_retries_then_fails_clearly(
    data: dict[str, Path], bucket: str, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    select_run = tmp_path / "run"
    shutil.copytree(data["baseline"], select_run)
    proxy.inject("PutObject", "500", count=None)  # the endpoint answers every upload with HTTP 500
    uri = f"s3://{bucket}/select"
    code = main(["select", *ARGS, "--run", str(select_run), "--out", uri])
    assert code == 4
    assert _last_line(capsys.readouterr().err) == (
        f"nodeseg select: error: {uri}/model.pt: upload failed after 3 attempts: InternalError (HTTP 500): "
        "injected fault")
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2 and "upload attempt 1/3" in retries[0] and "upload attempt 2/3" in retries[1]
    assert proxy.ops("PutObject") == 3 * 2  # 3 transfers with backoff, each 2 requests (botocore's retry)
    assert _direct().list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # no object, no marker
    assert _tree(select_run) == _tree(data["baseline"])  # the input run is untouched


@pytest.mark.slow
def test_s3_failure_mid_upload_leaves_no_partial_object(
    data: dict[str, Path], bucket: str, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    for name, value in {**S3_ENV, "NODESEG_S3_MULTIPART_THRESHOLD": "1"}.items():  # every file in parts
        monkeypatch.setenv(name, value)
    proxy.inject("UploadPart", "drop", skip=1, count=None)  # manifest.json gets through, then connections drop
    uri = f"s3://{bucket}/shards"
    code = main(["preprocess", *ARGS, "--raw", str(data["raw"]), "--out", uri])
    assert code == 4
    assert _last_line(capsys.readouterr().err).startswith(
        f"nodeseg preprocess: error: {uri}/train/part-00000.parquet: upload failed after 3 attempts: ")
    assert len([r for r in caplog.records if "retrying in" in r.getMessage()]) == 2
    s3 = _direct()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["shards/manifest.json"]  # the file that completed; the failed one is not there at all
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # every attempt aborted
    assert proxy.ops("AbortMultipartUpload") >= 3

    # without its marker the half-published folder is never consumed
    proxy.faults.clear()
    code = main(["pretrain", *ARGS, "--shards", uri, "--out", str(tmp_path / "run")])
    assert code == 4
    assert _last_line(capsys.readouterr().err) == (
        f"nodeseg pretrain: error: {uri}: incomplete prefix: marker {MARKER} is missing "
        "(the upload failed or is still running)")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- runaway solves, NaN


@pytest.fixture(scope="module")
def refined(data: dict[str, Path]) -> dict[str, Path]:
    """select → refine (one epoch) on the baseline run; NaN-poisoned shards with the same manifest."""
    root, params = data["root"], _params()
    select_checkpoint(data["baseline"], root / "select", params.select)
    refine(data["shards"], root / "select" / "model.pt", root / "refine", params)
    poisoned = root / "poisoned"
    shutil.copytree(data["shards"], poisoned)
    for f in (poisoned / "train").glob("part-*.parquet"):  # every training image NaN: rot after ingest
        table = pq.read_table(f)
        nan = [np.full(len(b) // 4, np.nan, np.float32).tobytes() for b in table.column("image").to_pylist()]
        i = table.schema.get_field_index("image")
        pq.write_table(table.set_column(i, table.schema.field(i), pa.array(nan, pa.binary())), f)
    return {"unet": root / "select" / "model.pt", "refine": root / "refine", "poisoned": poisoned}


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("contour.solver.max_nfe=5", "forward pass: max_nfe exceeded after 5 evaluations"),
        ("contour.solver.max_num_steps=1", "forward pass: max_num_steps exceeded"),
        ("contour.solver.first_step=1e-50", "backward pass: underflow in dt 1e-50 at t=1"),
    ],
    ids=["nfe-cap", "step-cap", "dt-underflow"],
)
def test_runaway_solve_stops_with_one_line(data: dict[str, Path], refined: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str], override: str, problem: str) -> None:
    run = tmp_path / "refine"
    shutil.copytree(refined["refine"], run)
    before = _tree(run)
    code = main(["refine", *ARGS, "--set", override, "--shards", str(data["shards"]), "--unet", str(refined["unet"]),
                 "--out", str(run)])
    last = _last_line(capsys.readouterr().err)
    assert code == 3
    assert last.startswith("nodeseg refine: error: refine: epoch 1 step 1: dopri5 solve ran away in the "), last
    assert problem in last and "raise atol or the caps, or lower the learning rate" in last
    assert problem in DOC.read_text()
    assert last.endswith("; the last good checkpoint is kept (none yet)")
    # other solver settings make another run: the earlier checkpoints were moved aside, byte for byte
    after = _tree(run)
    moved = {k: v for k, v in after.items() if k.startswith("checkpoints/superseded/")}
    assert list(moved.values()) == [before["checkpoints/epoch-0001.pt"]]
    assert {k: v for k, v in after.items() if k not in moved} == {
        k: v for k, v in before.items() if k != "checkpoints/epoch-0001.pt"}  # model.pt, logs untouched


def test_nan_loss_keeps_the_last_good_checkpoint(data: dict[str, Path], refined: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(data["baseline"], run)
    before = _tree(run)
    steps = len(_rows(run / "train_log.csv"))
    # one more epoch of the same run (same settings and manifest, so it resumes) on shards that rotted
    code = main(["pretrain", *ARGS, "--set", f"pretrain.epochs={EPOCHS + 1}", "--shards", str(refined["poisoned"]),
                 "--out", str(run)])
    last = _last_line(capsys.readouterr().err)
    assert code == 3
    kept = ckpt.checkpoint_path(run / "checkpoints", EPOCHS)
    assert last == (f"nodeseg pretrain: error: pretrain: epoch {EPOCHS + 1} step {steps + 1}: the loss became nan;"
                    f" the last good checkpoint is kept ({kept})")
    assert _tree(run) == before  # every checkpoint and log as it was
    assert "the loss became nan" in DOC.read_text()
    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()],
        filter_string="tags.`nodeseg.stage` = 'pretrain' and attributes.status = 'FAILED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    assert runs and runs[0].data.tags["nodeseg.error"] == last.split("error: ", 1)[1]


def test_non_finite_ode_state_keeps_the_last_good_checkpoint(data: dict[str, Path], refined: dict[str, Path],
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "refine"
    shutil.copytree(refined["refine"], run)
    before = _tree(run)
    code = main(["refine", *ARGS, "--set", "refine.epochs=2", "--shards", str(refined["poisoned"]),
                 "--unet", str(refined["unet"]), "--out", str(run)])
    last = _last_line(capsys.readouterr().err)
    assert code == 3
    assert re.fullmatch(r"nodeseg refine: error: refine: epoch 2 step \d+: dopri5 solve ran away in the forward "
                        r"pass: non-finite values in state .*; the last good checkpoint is kept \((.*)\)", last), last
    assert last.endswith(f"({ckpt.checkpoint_path(run / 'checkpoints', 1)})")
    assert "forward pass: non-finite values in state" in DOC.read_text()
    assert _tree(run) == before
