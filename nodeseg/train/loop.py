"""The one training loop: Adam, LR ramp-up then annealing on plateau, atomic checkpoints, resume, DDP.

The loop knows nothing of the model beyond ``model(image) -> phi`` and, for Neural-ODE models, the
``nfe_forward`` / ``nfe_backward`` counters of the last step and the regularisers of its solves
(``kinetic_energy`` / ``jacobian_frobenius`` weights > 0: each weighted integral joins the loss, and the
train log and MLflow get its value and its share of the loss per step, beside NFE). Every stage that trains
(pretrain, refine, image-evolve, tune trials) calls :func:`fit`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from nodeseg.data.transforms import AugmentConfig
from nodeseg.errors import SolverError, TrainingDiverged, check_arg
from nodeseg.losses import balanced_mean, narrow_band_mse, narrow_band_sums
from nodeseg.priors import loss_terms as prior_loss_terms
from nodeseg.regularisers import REGULARISERS
from nodeseg.solve import regulariser_values, set_regularisation
from nodeseg.tracking import Tracker
from nodeseg.train import checkpoint as ckpt
from nodeseg.train.ddp import DistInfo, all_reduce_sum, barrier

log = logging.getLogger(__name__)


#: the TrainConfig fields that change how fast or how verbosely a run goes, never what it trains: a resume ignores
#: them, and dvc.yaml does not rerun a stage for them (nodeseg.params.RUNTIME_KEYS)
RUNTIME_FIELDS = ("num_workers", "log_every")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training stage (a section of params.yaml)."""

    epochs: int = 10
    batch_size: int = 8  # global batch: each of W ranks takes batch_size / W
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 50  # linear ramp-up of the LR from warmup_start_factor * lr
    warmup_start_factor: float = 0.1
    plateau_patience: int = 2  # epochs without improvement before the LR is annealed
    plateau_factor: float = 0.5
    min_lr: float = 1e-6
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    band_width: float = 1.0  # width (pixels) of the tanh narrow band in the loss
    # the first N steps train on the class-balanced loss, ½ mean inside the object + ½ mean outside (φ < 0 / φ ≥ 0),
    # then the paper's loss. A UNet trained from scratch on the plain loss can predict no object for hundreds of
    # steps where the object is a few % of the image; trained balanced to the end it over-segments
    # (benchmarks/README.md, "Accuracy"). 0: never (the paper)
    class_balance_steps: int = 0
    select_samples: int = 8  # per-sample validation losses of the first N samples go into each checkpoint
    max_batches_per_epoch: int = 0  # 0: the whole training set every epoch
    val_batch_size: int = 8
    num_workers: int = 0
    log_every: int = 10
    # NHWC memory format for the model and image batches: faster convolutions on CPU (oneDNN) and on GPU tensor
    # cores; the same values up to rounding (benchmarks/README.md, figure 3)
    channels_last: bool = True
    # regularisers of the dynamics (nodeseg.regularisers, RNODE): weights of ∫‖f‖²/D dt and of the Hutchinson
    # estimate of ∫‖∂f/∂y‖_F²/D dt in the loss; 0 = off. STEER: each training solve ends at t1 ± U(jitter)
    kinetic_energy: float = 0.0
    jacobian_frobenius: float = 0.0
    end_time_jitter: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        check_arg(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        check_arg(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check_arg(self.lr > 0, "lr", self.lr, "> 0")
        check_arg(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "two values in [0, 1)")
        check_arg(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check_arg(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check_arg(0 < self.warmup_start_factor <= 1, "warmup_start_factor", self.warmup_start_factor, "in (0, 1]")
        check_arg(self.plateau_patience >= 0, "plateau_patience", self.plateau_patience, ">= 0")
        check_arg(0 < self.plateau_factor < 1, "plateau_factor", self.plateau_factor, "in (0, 1)")
        check_arg(self.min_lr >= 0, "min_lr", self.min_lr, ">= 0")
        check_arg(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0 (0 disables)")
        check_arg(self.band_width > 0, "band_width", self.band_width, "> 0")
        check_arg(self.class_balance_steps >= 0, "class_balance_steps", self.class_balance_steps, ">= 0")
        check_arg(self.select_samples >= 1, "select_samples", self.select_samples, ">= 1")
        check_arg(self.max_batches_per_epoch >= 0, "max_batches_per_epoch", self.max_batches_per_epoch, ">= 0")
        check_arg(self.val_batch_size >= 1, "val_batch_size", self.val_batch_size, ">= 1")
        check_arg(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0")
        check_arg(self.log_every >= 1, "log_every", self.log_every, ">= 1")
        for name in (*REGULARISERS, "end_time_jitter"):
            value = getattr(self, name)
            check_arg(math.isfinite(value) and value >= 0, name, value, "a number >= 0 (0 = off)")

    @property
    def regularisers(self) -> dict[str, float]:
        """The regularisers that are on, with their weights."""
        return {n: getattr(self, n) for n in REGULARISERS if getattr(self, n) > 0}

    def resumable_view(self) -> dict[str, Any]:
        """The settings a resume must agree on (``epochs`` may grow to extend a run)."""
        d = asdict(self)
        d.pop("epochs")
        for name in RUNTIME_FIELDS:
            d.pop(name)
        for name in (*REGULARISERS, "end_time_jitter", "class_balance_steps"):  # added later: left out when off,
            if d[name] == 0:  # so that the fingerprints of earlier runs still match
                d.pop(name)
        return d


@dataclass
class FitResult:
    """What a finished :func:`fit` leaves: the checkpoints, the history, and the final model."""

    checkpoint_dir: Path
    epochs_done: int
    resumed_from: int
    history: list[dict[str, float]]
    last_checkpoint: Path | None


def small_val_warning(n_val: int, samples: int, key: str) -> str:
    """The one line saying that a validation split smaller than ``key`` (= ``samples``) is used whole."""
    return (f"the validation split has {n_val} sample(s), fewer than {key} ({samples}): the selection "
            f"uses the mean loss of all {n_val}")


def _nfe(model: nn.Module) -> tuple[int, int] | None:
    """(forward, backward) evaluations of the last step for Neural-ODE models, None for plain networks."""
    if not hasattr(model, "nfe_forward"):
        return None
    return int(model.nfe_forward), int(model.nfe_backward)


def _batch_tensors(
    batch: Mapping[str, Any], device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = batch["image"].to(device, non_blocking=True)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    phi = batch["phi"].to(device, non_blocking=True)
    valid = batch["valid"].to(device, non_blocking=True) if "valid" in batch else torch.ones_like(phi)
    return image, phi, valid


@torch.no_grad()
def validation_losses(
    model: nn.Module, dataset: Dataset, *, band_width: float, batch_size: int, info: DistInfo,
    class_balance: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-sample validation losses in dataset order (every rank gets all of them) and summary statistics.

    Ranks take interleaved samples and the results are summed, so the values do not depend on the number of
    ranks. The statistics are the mean NFE per batch and the IoU over the split (φ̂ < 0 against φ < 0).
    """
    was_training = model.training
    model.eval()
    n = len(dataset)  # type: ignore[arg-type]
    losses = torch.zeros(n, dtype=torch.float64)
    mine = list(range(info.rank, n, info.world_size))
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False)
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # nfe, batches, tp, fp, fn
    pos = 0
    for batch in loader:
        image, phi, valid = _batch_tensors(batch, info.device)
        pred = model(image)
        per = narrow_band_mse(pred, phi, valid, width=band_width, reduction="none", balance=class_balance)
        idx = torch.tensor(mine[pos : pos + len(per)])
        losses[idx] = per.double().cpu()
        pos += len(per)
        keep = valid != 0
        p, t = (pred < 0) & keep, (phi < 0) & keep
        sums[2] += float((p & t).sum())
        sums[3] += float((p & ~t).sum())
        sums[4] += float((~p & t).sum())
        counts = _nfe(model)
        if counts is not None:
            sums[0] += counts[0]
            sums[1] += 1
    model.train(was_training)
    if info.enabled:
        losses = losses.to(info.device)
        torch.distributed.all_reduce(losses)
        losses = losses.cpu()
        sums = all_reduce_sum(sums, info)
    nfe, batches, tp, fp, fn = sums
    stats = {"val_nfe": nfe / batches if batches else 0.0, "val_iou": tp / (tp + fp + fn) if tp + fp + fn else 0.0}
    return losses, stats


def _step_metrics(rec: Mapping[str, float]) -> dict[str, float]:
    """What MLflow gets of a training step's record (at step = the global step)."""
    return {f"train/{k}": v for k, v in rec.items() if k not in ("epoch", "step")}


def _epoch_metrics(row: Mapping[str, float]) -> dict[str, float]:
    """What MLflow gets of an epoch's row (at step = the epoch)."""
    return {k: v for k, v in row.items() if k not in ("epoch", "step")}


def _logged_history(history: list[dict[str, float]], steps_log: list[dict[str, float]], log_every: int
                    ) -> list[tuple[dict[str, float], int]]:
    """The (metrics, step) rows the loop logged for the epochs in ``history``: every ``log_every``-th step
    and each epoch's last, then the epochs."""
    def logged(i: int, rec: Mapping[str, float]) -> bool:
        last_of_epoch = i + 1 == len(steps_log) or steps_log[i + 1]["epoch"] != rec["epoch"]
        return int(rec["step"]) % log_every == 0 or last_of_epoch

    rows = [(_step_metrics(rec), int(rec["step"])) for i, rec in enumerate(steps_log) if logged(i, rec)]
    return rows + [(_epoch_metrics(row), int(row["epoch"])) for row in history]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    ckpt.atomic_write_bytes(path, buf.getvalue().encode())


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    seed: int,
    model_spec: Mapping[str, Any],
    data_id: str,
    info: DistInfo,
    tracker: Tracker,
    stage: str,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``train_set``; checkpoint every epoch into ``out_dir/checkpoints``; resume if possible.

    ``model_spec`` (how to rebuild the model) and ``data_id`` (which shards) go into every checkpoint and into
    the resume fingerprint with the training settings, so a checkpoint is only resumed by the run it belongs to.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    world = info.world_size
    if cfg.batch_size % world:
        raise ValueError(
            f"argument 'batch_size' ({cfg.batch_size}) must be divisible by the number of ranks ({world})"
        )
    per_rank = cfg.batch_size // world
    weights = cfg.regularisers
    set_regularisation(model, tuple(weights), cfg.end_time_jitter)
    n_val = len(val_set)  # type: ignore[arg-type]
    if n_val == 0:
        raise ValueError(f"{stage}: the validation split is empty: training cannot be validated or selected; "
                         "give the split at least one case (ingest.val_fraction)")
    n_first = min(n_val, cfg.select_samples)  # a split smaller than select_samples: all of it, with a warning
    first_key = f"val_loss_first{n_first}"
    if n_first < cfg.select_samples and info.is_main:
        log.warning("%s: %s", stage, small_val_warning(n_val, cfg.select_samples, f"{stage}.select_samples"))
    model.to(info.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    warmup = torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=max(cfg.warmup_steps, 1)
    )
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
    )
    # the world size is left out on purpose: the global batch and the sample order do not depend on it,
    # so an elastic job that restarts with fewer or more workers resumes the same run
    fp = ckpt.fingerprint(stage, dict(model_spec), cfg.resumable_view(), data_id, seed)

    start_epoch, global_step = 0, 0
    history: list[dict[str, float]] = []
    steps_log: list[dict[str, float]] = []
    previous_run: str | None = None  # the MLflow run the resumed checkpoint was written under
    if info.is_main:
        for torn in ckpt.remove_partial_writes(ckpt_dir):
            log.warning("removed %s, a checkpoint write that a killed run left unfinished", torn)
    found = ckpt.latest(ckpt_dir)
    if found is not None:
        path, state = found
        if state.get("fingerprint") != fp:
            if info.is_main:
                moved = ckpt.supersede(ckpt_dir, str(state.get("fingerprint")))
                log.warning("%s: checkpoints of a run with other settings moved to %s; starting afresh",
                            ckpt_dir, moved)
            barrier(info)
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            warmup.load_state_dict(state["warmup"])
            plateau.load_state_dict(state["plateau"])
            ckpt.set_rng_state(state["rng"])
            start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
            previous_run = state.get("mlflow_run_id")
            history = list(state["history"])
            steps_log = list(state["steps"])
            if info.is_main:
                log.info("resuming %s from %s (epoch %d)", stage, path, start_epoch)

    ddp_model: nn.Module = model
    if info.enabled:
        ddp_model = DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )

    sampler = DistributedSampler(train_set, num_replicas=world, rank=info.rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(
        train_set,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=True,
        persistent_workers=False,
    )
    if len(loader) == 0:
        raise ValueError(
            f"the training set ({len(train_set)} samples) is smaller than one global batch ({cfg.batch_size})"  # type: ignore[arg-type]
        )
    tracker.set_tags({"nodeseg.fingerprint": fp, "nodeseg.resumed_from_epoch": start_epoch})
    if start_epoch:  # this run carries the checkpointed history on: its metrics start at epoch 1 again
        tracker.log_metric_history(_logged_history(history, steps_log, cfg.log_every))
        if previous_run:
            tracker.resumes(previous_run)
    last_path: Path | None = ckpt.checkpoint_path(ckpt_dir, start_epoch) if start_epoch else None

    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)  # type: ignore[attr-defined]
        model.train()
        n_batches = len(loader) if not cfg.max_batches_per_epoch else min(len(loader), cfg.max_batches_per_epoch)
        # closed on any way out (an error, SIGTERM): cleared before the CLI prints its last line
        with tqdm(total=n_batches, desc=f"{stage} epoch {epoch + 1}/{cfg.epochs}", disable=not info.is_main,
                  mininterval=2.0, leave=False) as bar:
            t_epoch = time.perf_counter()
            loss_sum, loss_n = 0.0, 0
            for i, batch in enumerate(loader):
                if i >= n_batches:
                    break
                t0 = time.perf_counter()
                image, phi, valid = _batch_tensors(batch, info.device, cfg.channels_last)
                failure = ""
                sq_sum = torch.zeros((), device=info.device)
                n_valid = float((valid != 0).sum())
                balanced = global_step < cfg.class_balance_steps
                n_in = float(((valid != 0) & (phi < 0)).sum()) if balanced else 0.0
                prior_loss, prior_log = None, {}
                try:
                    pred = ddp_model(image)
                    if balanced:
                        s_in, s_out, _, _ = narrow_band_sums(pred, phi, valid, width=cfg.band_width)
                        sq_sum = s_in + s_out
                    else:
                        sq_sum = narrow_band_mse(pred, phi, valid, width=cfg.band_width, reduction="sum")
                    if not torch.isfinite(sq_sum):
                        failure = f"the loss became {sq_sum.item()}"
                    # priors on the ODE's intermediate states (nodeseg.priors): None when all are off
                    prior_loss, prior_log = prior_loss_terms(model)
                    if prior_loss is not None and not torch.isfinite(prior_loss):
                        failure = f"the prior penalties became {prior_log}"
                except SolverError as err:
                    failure = str(err)
                # one all-reduce per step: whether any rank failed, the valid (and object) pixels of the global batch
                failed, global_valid, global_in = all_reduce_sum([1.0 if failure else 0.0, n_valid, n_in], info)
                if failed:
                    raise TrainingDiverged(
                        f"{stage}: epoch {epoch + 1} step {global_step + 1}: {failure or 'another rank failed'};"
                        f" the last good checkpoint is kept ({last_path or 'none yet'})"
                    )
                # the mean over the global batch's valid pixels; DDP averages gradients over ranks, hence × world, so
                # that padded samples weigh the same as with one process whatever the split of the batch
                if balanced:  # the same global means as one process would take, whatever the split
                    loss = world * balanced_mean(s_in, s_out, global_in, global_valid - global_in)
                    data_loss = float(loss.detach()) / world  # this rank's share of the balanced loss
                else:
                    loss = sq_sum * (world / max(global_valid, 1.0))
                    data_loss = float(sq_sum.detach()) / max(n_valid, 1.0)  # this rank's share of the batch
                reg = regulariser_values(model) if weights else {}
                for name, value in reg.items():  # a mean over this rank's samples: DDP averages it over ranks
                    loss = loss + weights[name] * value
                if prior_loss is not None:  # a per-rank mean: DDP's gradient average makes it the global one
                    loss = loss + prior_loss
                opt.zero_grad(set_to_none=True)
                try:
                    loss.backward()
                except SolverError as err:  # the adjoint solve runs inside backward(): same message as the forward's
                    raise TrainingDiverged(
                        f"{stage}: epoch {epoch + 1} step {global_step + 1}: {err}; the last good checkpoint is kept"
                        f" ({last_path or 'none yet'})"
                    ) from None
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                global_step += 1
                if global_step <= cfg.warmup_steps:
                    warmup.step()
                counts = _nfe(model)
                rec = {
                    "epoch": epoch + 1,
                    "step": global_step,
                    "loss": data_loss,
                    "lr": opt.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - t0,
                }
                if counts is not None:
                    rec["nfe_forward"], rec["nfe_backward"] = float(counts[0]), float(counts[1])
                if reg:
                    total = rec["loss"] + sum(weights[n] * float(v.detach()) for n, v in reg.items())
                    for name, value in reg.items():  # the integral, and its weighted share of this rank's loss
                        rec[name] = float(value.detach())
                        rec[f"{name}_share"] = weights[name] * rec[name] / total if total > 0 else 0.0
                rec.update(prior_log)  # prior_<name>: each penalty's unweighted value (train log and MLflow)
                steps_log.append(rec)
                loss_sum += rec["loss"]
                loss_n += 1
                if global_step % cfg.log_every == 0 or i == n_batches - 1:
                    tracker.log_metrics(_step_metrics(rec), step=global_step)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", **({"nfe": counts[0]} if counts else {}))
                bar.update(1)
        train_loss = all_reduce_sum([loss_sum, float(loss_n)], info)
        per_sample, val_stats = validation_losses(
            model, val_set, band_width=cfg.band_width, batch_size=cfg.val_batch_size, info=info,
            class_balance=global_step < cfg.class_balance_steps,  # the loss the epoch ended on
        )
        val_loss = float(per_sample.mean()) if len(per_sample) else float("nan")
        first = float(per_sample[:n_first].mean()) if len(per_sample) else float("nan")
        if not math.isfinite(val_loss):
            raise TrainingDiverged(
                f"{stage}: epoch {epoch + 1}: the validation loss is {val_loss}; the last good checkpoint is kept"
                f" ({last_path or 'none yet'})"
            )
        plateau.step(val_loss)
        row = {
            "epoch": epoch + 1,
            "step": global_step,
            "train_loss": train_loss[0] / max(train_loss[1], 1.0),
            "val_loss": val_loss,
            first_key: first,
            "lr": opt.param_groups[0]["lr"],
            **val_stats,
            "seconds": time.perf_counter() - t_epoch,
        }
        history.append(row)
        tracker.log_metrics(_epoch_metrics(row), step=epoch + 1)
        if info.is_main:
            last_path = ckpt.checkpoint_path(ckpt_dir, epoch + 1)
            ckpt.save(
                last_path,
                {
                    "stage": stage,
                    "fingerprint": fp,
                    "model_spec": dict(model_spec),
                    "data_id": data_id,
                    "seed": seed,
                    "epoch": epoch + 1,
                    "global_step": global_step,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "warmup": warmup.state_dict(),
                    "plateau": plateau.state_dict(),
                    "rng": ckpt.rng_state(),
                    "metrics": row,
                    "val_head": [float(v) for v in per_sample[:n_first]],
                    "val_samples": n_val,
                    "history": history,
                    "steps": steps_log,
                    "train_config": asdict(cfg),
                    "mlflow_run_id": tracker.run_id,  # a resumed run links to it (and marks it KILLED if left RUNNING)
                },
            )
            _write_csv(out_dir / "train_log.csv", steps_log)
            _write_csv(out_dir / "val_log.csv", history)
            log.info("%s epoch %d: val_loss %.5f (first %d: %.5f)", stage, epoch + 1, val_loss, n_first, first)
        barrier(info)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)

    if info.is_main:
        _write_csv(out_dir / "train_log.csv", steps_log)
        _write_csv(out_dir / "val_log.csv", history)
    return FitResult(
        checkpoint_dir=ckpt_dir,
        epochs_done=max(cfg.epochs, start_epoch),
        resumed_from=start_epoch,
        history=history,
        last_checkpoint=last_path,
    )
