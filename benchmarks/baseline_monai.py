"""The outside baseline of the accuracy benchmark: MONAI's ``UNet`` trained with Dice+CE on the same shards.

Same split, image size, batch size, augmentation and step budget as ``nodeseg pretrain``; the widths and depth
follow the nodeseg UNet preset it is compared with (MONAI's residual units, two per level, instance norm: its
defaults), Adam at ``LR`` (chosen on the phantoms' validation set, see there). The checkpoint kept is chosen
by the same rule as ``nodeseg select`` (the lowest loss on the first ``select.samples`` validation samples, here MONAI's Dice+CE), and it is scored by ``nodeseg``'s own metric code
(``nodeseg.stages.evaluate.score``) through :class:`LogitAsPhi`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from nodeseg.data.shards import SliceDataset
from nodeseg.models.registry import PRESETS
from nodeseg.params import Params

__all__ = ["LogitAsPhi", "monai_unet", "train_monai_baseline"]


class LogitAsPhi(nn.Module):
    """A logit model seen as a φ model: φ = −w·logit/2, so that (1 − tanh(φ/w))/2 = sigmoid(logit).

    ``nodeseg``'s metrics score the saliency (1 − tanh(φ/w))/2 and the mask φ < 0, i.e. the sigmoid
    probability and logit > 0: the baseline is scored by exactly the code that scores the nodeseg models.
    """

    def __init__(self, net: nn.Module, width: float = 1.0) -> None:
        super().__init__()
        self.net, self.width = net, float(width)

    def forward(self, image: Tensor) -> Tensor:
        return -0.5 * self.width * self.net(image)


def monai_unet(preset: str, sizes: dict[str, Any] | None = None, in_channels: int = 1) -> nn.Module:
    """MONAI's 2-D ``UNet`` with the widths and depth of nodeseg's UNet ``preset`` (+ ``sizes``)."""
    from monai.networks.nets import UNet

    cfg = {**PRESETS["unet"][preset], **(sizes or {})}
    base, depth, cap = cfg["base_channels"], cfg["depth"], cfg.get("max_channels")
    channels = [min(base * 2**i, cap) if cap else base * 2**i for i in range(depth + 1)]
    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=1, channels=channels,
                strides=(2,) * depth, num_res_units=2)


def _steps(cfg: Any, n_train: int) -> tuple[int, int]:
    per_epoch = math.ceil(n_train / cfg.batch_size)
    if cfg.max_batches_per_epoch:
        per_epoch = min(per_epoch, cfg.max_batches_per_epoch)
    return cfg.epochs, per_epoch


#: Adam's learning rate: of 1e-3, 3e-3 and 1e-2 on the default phantoms (seed 1, the 560-step budget), 1e-3 left
#: MONAI's UNet at IoU 0.000 (Dice+CE still 0.96 and falling), 3e-3 at 0.397, 1e-2 at 0.576 (ours: 0.610)
LR = 1e-2


def train_monai_baseline(shards: str, params: Params, seed: int, lr: float = LR) -> tuple[nn.Module, dict[str, Any]]:
    """Train the baseline on ``shards`` with ``params.pretrain``'s budget; (the chosen model, a record)."""
    from monai.losses import DiceCELoss

    cfg = params.pretrain
    augment = cfg.augment if cfg.augment.enabled else None
    train = SliceDataset(shards, "train", augment=augment, seed=seed)
    val = SliceDataset(shards, "val")
    head = Subset(val, range(min(params.select.samples, len(val))))
    torch.manual_seed(seed)
    net = monai_unet(params.unet.preset, dict(params.unet.sizes), int(train[0]["image"].shape[0]))
    loss_fn = DiceCELoss(sigmoid=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    epochs, per_epoch = _steps(cfg, len(train))
    gen = torch.Generator().manual_seed(seed)
    best, best_loss, history = copy.deepcopy(net.state_dict()), math.inf, []
    for epoch in range(epochs):
        train.set_epoch(epoch)
        net.train()
        loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=gen, drop_last=False)
        for i, batch in enumerate(loader):
            if i >= per_epoch:
                break
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(batch["image"]), batch["mask"])
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            losses = [float(loss_fn(net(b["image"]), b["mask"])) for b in DataLoader(head, batch_size=1)]
        val_loss = sum(losses) / len(losses)
        history.append(val_loss)
        if val_loss < best_loss:
            best, best_loss = copy.deepcopy(net.state_dict()), val_loss
    net.load_state_dict(best)
    record = {"parameters": sum(p.numel() for p in net.parameters()), "epochs": epochs, "steps_per_epoch": per_epoch,
              "selected_epoch": history.index(best_loss) + 1, "val_head_loss": history, "loss": "DiceCELoss(sigmoid)",
              "optimizer": f"Adam lr {lr:g}"}
    return LogitAsPhi(net).eval(), record
