"""Figure 5 — inference throughput: slices per second of UNet, Contour Evolution, Image Evolution and `predict`.

    python -m benchmarks.inference [--quick] [--reps N] [--volume PATH]

Models in eval mode under ``torch.no_grad``, a batch of ``batch`` slices of ``size``², timed interleaved:
the UNet alone, Contour Evolution (the frozen UNet, then the contour's ODE) and Image Evolution, with the
solver settings of params.yaml (contour: dopri5 atol 1e-3; image: 4 Euler steps) and also Image Evolution
with dopri5. The zero-initialised layers are perturbed (as after training), so the adaptive solves take a
realistic number of steps; NFE per batch is reported.

Whole volume: ``nodeseg predict`` (``predict(model_ref, volume, output)``) on one CT volume — a pseudo-CT
rendered from a real KiTS19 label volume (``--volume`` or case_00001 of the shared data) or a phantom —
from a saved Contour Evolution checkpoint: reading and decoding the NIfTI, HU windowing, resizing every
slice to the model's size, the model, resizing φ back, and writing the gzipped label volume. Reported:
slices per second, and the share of the time the model itself takes (the same slices through the model
alone, timed alongside).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from benchmarks import common
from nodeseg.models.registry import build_model
from nodeseg.train import checkpoint as ckpt

CONTOUR_SOLVER = {"method": "dopri5", "atol": 1e-3, "rtol": 0.0, "first_step": 0.5, "adjoint": True}
IMAGE_SOLVER = {"method": "euler", "step_size": 0.25, "first_step": None, "adjoint": True}


def _models(size: int, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    unet = build_model("unet", "unet-tiny")
    contour = build_model("contour", "tiny", solver=CONTOUR_SOLVER, unet=unet)
    image = build_model("image", "nodeunet-tiny", solver=IMAGE_SOLVER)
    image_dopri = build_model("image", "nodeunet-tiny", solver={**CONTOUR_SOLVER})
    out = {"UNet (unet-tiny)": unet, "Contour Evolution (tiny, dopri5)": contour,
           "Image Evolution (nodeunet-tiny, euler ×4)": image, "Image Evolution (nodeunet-tiny, dopri5)": image_dopri}
    for m in out.values():
        common.perturb_zero_init(m, std=0.3)
        m.to(device).eval()
    return out


def _contour_spec(size: int) -> dict[str, Any]:
    return {
        "kind": "contour", "preset": "tiny", "sizes": {}, "solver": CONTOUR_SOLVER,
        "unet": {"kind": "unet", "preset": "unet-tiny", "sizes": {"in_channels": 1}},
        "preprocessing": {"size": size, "hu_window": [-79.0, 304.0], "normalisation": "minmax",
                          "zscore_stats": [101.0, 76.9], "source": "kits19"},
    }


def _volume(path: Path | None, quick: bool, dest: Path) -> tuple[Path, str]:
    """A CT volume to segment: ``path``, a pseudo-CT of a real KiTS19 case, or a small phantom."""
    if path is not None:
        return path, str(path)
    from nodeseg.data.kits19 import open_case
    from nodeseg.data.render import synthesize_imaging

    case = common.SHARED_DATA / "kits19-interpolated" / "case_00001"
    rng = np.random.default_rng(0)
    if not quick and (case / "segmentation.nii.gz").is_file():
        opened = open_case(case, require_imaging=False)
        seg = opened.load_segmentation()
        hu = synthesize_imaging(seg, rng, spacing=opened.spacing)
        affine, what = opened.affine, f"pseudo-CT of {case.name} {tuple(seg.shape)}"
    else:
        hu = rng.integers(-200, 300, size=(6, 40, 40)).astype(np.int16)
        affine, what = np.diag([-0.8, -0.8, -3.0, 1.0]), "random phantom (6, 40, 40)"
    out = dest / "imaging.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), out)
    return out, what


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--volume", type=Path, default=None, help="a CT volume (NIfTI) for the whole-volume figure")
    args = p.parse_args(argv)
    device = common.setup(args)
    reps = args.reps or (1 if args.quick else 7)
    size, batch = (16, 2) if args.quick else (64, 16)
    models = _models(size, device)
    image = common.blobs(batch, size, seed=1)[0].to(device)
    nfe: dict[str, int] = {}

    def runner(name: str, model: nn.Module) -> Any:
        @torch.no_grad()
        def run() -> None:
            model(image)
            if hasattr(model, "nfe_forward"):
                nfe[name] = int(model.nfe_forward)

        return run

    times = common.interleaved({n: runner(n, m) for n, m in models.items()}, reps=reps, warmup=1, device=device,
                               clock=args.clock)
    rows: list[dict[str, Any]] = []
    for name in models:
        t = times[name]["median"]
        rows.append({"model": name, "size": size, "batch": batch, "nfe_forward": nfe.get(name, 0),
                     "seconds_per_batch": t, "slices_per_second": batch / t, "timing": times[name]})

    # whole volume through `predict`
    from nodeseg.stages.predict import predict

    with tempfile.TemporaryDirectory(prefix="nodeseg-bench-") as tmp:
        tmpd = Path(tmp)
        volume, what = _volume(args.volume, args.quick, tmpd)
        contour = models["Contour Evolution (tiny, dopri5)"]
        model_path = tmpd / "model.pt"
        ckpt.save(model_path, {"model_spec": _contour_spec(size), "model": contour.state_dict()})
        n_slices = int(nib.load(volume).shape[0])
        slices = common.blobs(min(n_slices, 64), size, seed=2)[0].to(device)

        @torch.no_grad()
        def model_only() -> None:
            for i in range(0, n_slices, 8):  # predict's batch size
                contour(slices[(i % len(slices)):(i % len(slices)) + 8])

        vol_times = common.interleaved(
            {"predict": lambda: predict(str(model_path), volume, tmpd / "labels.nii.gz"), "model only": model_only},
            reps=max(1, reps // 2), warmup=1, device=device, clock=args.clock)
    t_pred, t_model = vol_times["predict"]["median"], vol_times["model only"]["median"]
    rows.append({"model": "predict: whole volume (Contour Evolution)", "size": size, "batch": 8,
                 "nfe_forward": nfe.get("Contour Evolution (tiny, dopri5)", 0), "seconds_per_batch": t_pred,
                 "slices_per_second": n_slices / t_pred, "volume": what, "slices": n_slices,
                 "model_share_of_predict": t_model / t_pred, "timing": vol_times})
    for r in rows:
        r["load_average"] = common.load_average()
    print("Figure 5 — inference throughput (slices per second, eval mode, no_grad)\n")
    print(common.table(rows, ["model", "size", "batch", "nfe_forward", "seconds_per_batch", "slices_per_second",
                              "model_share_of_predict"]))
    print(f"\nvolume: {what}")
    path = common.write_result(args.out, "inference", {"rows": rows}, device, args)
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
