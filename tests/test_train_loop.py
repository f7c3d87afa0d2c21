"""The training loop: resume equals an uninterrupted run, NaN and runaway solves stop cleanly, checkpoints load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from nodeseg.data.transforms import AugmentConfig
from nodeseg.errors import InputError, TrainingDiverged
from nodeseg.levelset import signed_distance
from nodeseg.models.registry import build_model
from nodeseg.solve import SolverConfig
from nodeseg.tracking import Tracker
from nodeseg.train import checkpoint as ckpt
from nodeseg.train.ddp import DistInfo
from nodeseg.train.loop import TrainConfig, fit


class Discs(Dataset):
    """Noisy discs with their exact signed distance: real data, small enough for a unit test."""

    def __init__(self, n: int, size: int = 16, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:size, :size]
        self.items = []
        for _ in range(n):
            cy, cx, r = rng.uniform(5, size - 5), rng.uniform(5, size - 5), rng.uniform(2.5, 4.5)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            image = mask + rng.normal(0, 0.3, mask.shape)
            self.items.append({
                "image": torch.tensor(image, dtype=torch.float32)[None],
                "phi": torch.from_numpy(signed_distance(mask))[None],
                "mask": torch.tensor(mask, dtype=torch.float32)[None],
                "valid": torch.ones(1, size, size),
            })

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


CFG = TrainConfig(epochs=3, batch_size=4, lr=3e-3, warmup_steps=3, plateau_patience=0, val_batch_size=4,
                  augment=AugmentConfig(enabled=False))
SPEC = {"kind": "unet", "preset": "unet-tiny", "sizes": {}}


def _fit(out: Path, cfg: TrainConfig = CFG, model: torch.nn.Module | None = None, **kw):  # noqa: ANN202
    torch.manual_seed(0)
    model = model if model is not None else build_model("unet", "unet-tiny")
    result = fit(model, Discs(12), Discs(8, seed=1), cfg, out, seed=0, model_spec=SPEC, data_id="discs",
                 info=DistInfo(), tracker=Tracker("test", enabled=False), stage="test", **kw)
    return model, result


def test_resume_ends_with_the_same_weights(tmp_path: Path) -> None:
    full, _ = _fit(tmp_path / "full")
    _fit(tmp_path / "cut", TrainConfig(**{**CFG.__dict__, "epochs": 2}))
    # a fresh process would rebuild the model from scratch and find the epoch-2 checkpoint
    resumed, result = _fit(tmp_path / "cut", model=build_model("unet", "unet-tiny", base_channels=12))
    assert result.resumed_from == 2
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    hist_full = ckpt.load(ckpt.checkpoint_path(tmp_path / "full" / "checkpoints", 3))["history"]
    hist_cut = ckpt.load(ckpt.checkpoint_path(tmp_path / "cut" / "checkpoints", 3))["history"]
    assert [h["val_loss"] for h in hist_full] == [h["val_loss"] for h in hist_cut]


def test_checkpoints_hold_what_selection_needs(tmp_path: Path) -> None:
    _fit(tmp_path)
    found = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [e for e, _ in found] == [1, 2, 3]
    payload = ckpt.load(found[-1][1])  # weights_only=True
    assert len(payload["val_head"]) == CFG.select_samples
    assert payload["model_spec"] == SPEC
    assert {"val_loss", "val_iou", "train_loss", "lr"} <= set(payload["metrics"])
    lines = (tmp_path / "val_log.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("epoch,step")


def test_changed_settings_supersede_old_checkpoints(tmp_path: Path) -> None:
    _fit(tmp_path, TrainConfig(**{**CFG.__dict__, "epochs": 1}))
    _, result = _fit(tmp_path, TrainConfig(**{**CFG.__dict__, "epochs": 1, "lr": 1e-3}))
    assert result.resumed_from == 0
    moved = list((tmp_path / "checkpoints" / "superseded").glob("*/epoch-0001.pt"))
    assert len(moved) == 1, "the other run's checkpoint is kept, not deleted"


class _NaNAfter(torch.nn.Module):
    """A UNet whose output turns NaN from the ``n``-th training call on (a diverging model)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.net = build_model("unet", "unet-tiny")
        self.n, self.calls = n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        out = self.net(x)
        return out * float("nan") if self.calls >= self.n else out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged, match="the loss became nan") as err:
        _fit(tmp_path, model=_NaNAfter(n=5))  # 3 steps per epoch: dies in epoch 2
    assert "epoch-0001.pt" in str(err.value)
    assert [e for e, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [1]
    ckpt.load(ckpt.checkpoint_path(tmp_path / "checkpoints", 1))


def test_runaway_solve_stops_training_cleanly(tmp_path: Path) -> None:
    model = build_model("image", "tiny", solver=SolverConfig(max_nfe=5))  # dopri5 needs more than 5
    with pytest.raises(TrainingDiverged, match="NFE|evaluations"):
        _fit(tmp_path, model=model)
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == []


def test_foreign_or_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "epoch-0001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        ckpt.load(bad)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a nodeseg checkpoint"):
        ckpt.load(tmp_path / "other.pt")


def test_batch_must_split_over_ranks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="divisible by the number of ranks"):
        fit(build_model("unet", "unet-tiny"), Discs(8), Discs(4), TrainConfig(batch_size=3), tmp_path, seed=0,
            model_spec=SPEC, data_id="x", info=DistInfo(world_size=2), tracker=Tracker("t", enabled=False),
            stage="t")


@pytest.mark.parametrize(("field", "value"), [("epochs", 0), ("lr", 0.0), ("plateau_factor", 1.0),
                                              ("batch_size", 0), ("band_width", -1.0), ("kinetic_energy", -0.1),
                                              ("jacobian_frobenius", float("nan")), ("end_time_jitter", -1.0)])
def test_bad_train_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def _image_model(**solver: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("image", "tiny", solver={"method": "euler", "steps": 2, "first_step": None, **solver})


def test_regularisers_enter_the_loss_and_are_logged_per_step(tmp_path: Path) -> None:
    """Each regulariser's value and its share of the loss per step in train_log.csv (and MLflow's step
    metrics, which take every key of the record); f ≡ 0 at initialisation makes both 0 at the first step."""
    import csv
    import dataclasses

    from nodeseg.train.loop import _step_metrics

    cfg = dataclasses.replace(CFG, epochs=1, kinetic_energy=0.5, jacobian_frobenius=0.25, end_time_jitter=0.1)
    _fit(tmp_path / "on", cfg, model=_image_model())
    rows = list(csv.DictReader((tmp_path / "on" / "train_log.csv").open()))
    assert len(rows) == 3
    for name in ("kinetic_energy", "jacobian_frobenius"):
        values = [float(r[name]) for r in rows]
        shares = [float(r[f"{name}_share"]) for r in rows]
        assert values[0] == 0.0 and all(v > 0 for v in values[1:]), values
        assert all(0 <= s < 1 for s in shares) and shares[-1] > 0
    r = {k: float(v) for k, v in rows[-1].items()}
    total = r["loss"] + 0.5 * r["kinetic_energy"] + 0.25 * r["jacobian_frobenius"]
    assert r["kinetic_energy_share"] == pytest.approx(0.5 * r["kinetic_energy"] / total, rel=1e-6)
    assert {"train/kinetic_energy", "train/jacobian_frobenius_share"} <= set(_step_metrics(r))


def test_regularisers_off_train_as_before(tmp_path: Path) -> None:
    """Weights 0 (the default) leave the record, the resume fingerprint and the weights as without the keys;
    weights > 0 change the training (a different run: a different fingerprint)."""
    import dataclasses

    cfg = dataclasses.replace(CFG, epochs=1)
    view = cfg.resumable_view()
    assert not {"kinetic_energy", "jacobian_frobenius", "end_time_jitter"} & set(view)
    model_a, res_a = _fit(tmp_path / "a", cfg, model=_image_model())
    zeros = dataclasses.replace(cfg, kinetic_energy=0.0, jacobian_frobenius=0.0, end_time_jitter=0.0)
    model_b, res_b = _fit(tmp_path / "b", zeros, model=_image_model())
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(),
                                                   strict=True))
    assert "kinetic_energy" not in res_a.history[0] and "kinetic_energy" not in (tmp_path / "a" / "train_log.csv"
                                                                               ).read_text()
    model_c, _ = _fit(tmp_path / "c", dataclasses.replace(cfg, kinetic_energy=1.0), model=_image_model())
    assert not all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_c.state_dict().values(),
                                                       strict=True))
    assert "kinetic_energy" in dataclasses.replace(cfg, kinetic_energy=1.0).resumable_view()


def test_regularisers_need_a_neural_ode(tmp_path: Path) -> None:
    import dataclasses

    with pytest.raises(ValueError, match="no ODE solver"):
        _fit(tmp_path, dataclasses.replace(CFG, kinetic_energy=0.1))
