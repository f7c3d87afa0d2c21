"""Check that 2-D models compute what they computed at a git ref: ``python -m benchmarks.same_2d --ref REF``.

A check, not a benchmark (not in ``benchmarks.__main__.SCRIPTS``): written for the dimension seam (issue 20
step 0), whose promise is that 2-D stays bit-identical. ``REF``'s ``nodeseg`` is extracted with
``git archive`` into a temporary folder (no worktree is added); this file then runs once per tree in a fresh
process (one torch thread) and dumps, for every 2-D preset at fixed seeds: the state_dict keys and shapes,
an eval forward (rk4, 2 steps; the zero-initialised last layers given random weights), and for the tiny
presets one training backward with the default solver (dopri5, adjoint) in NCHW and in channels-last memory
(outputs, gradients, NFE). Every tensor must be ``torch.equal``; exits 1 and names what differs otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dump(path: Path) -> None:
    """Write the outputs of the ``nodeseg`` on ``sys.path`` to ``path`` (``torch.save``)."""
    import torch
    from torch import nn

    import nodeseg
    from nodeseg.models import PRESETS, build_model
    from nodeseg.solve import SolverConfig

    tree = Path(os.environ["PYTHONPATH"]).resolve()
    if not Path(nodeseg.__file__).resolve().is_relative_to(tree):
        raise SystemExit(f"imported {nodeseg.__file__}, not the nodeseg of {tree}")
    torch.set_num_threads(1)
    out: dict[str, object] = {}

    def perturbed(kind: str, preset: str, **kw: object) -> nn.Module:
        torch.manual_seed(0)
        model = build_model(kind, preset, **kw)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Conv2d) and not m.weight.any():
                    m.weight.normal_(0, 0.05, generator=g)
                    if m.bias is not None:
                        m.bias.normal_(0, 0.05, generator=g)
        return model

    for kind, presets in PRESETS.items():
        for preset, sizes in presets.items():
            if sizes.get("spatial_dims", 2) != 2:
                continue
            key = f"{kind}/{preset}"
            kw = {} if kind == "unet" else {"solver": SolverConfig(method="rk4", step_size=0.5, first_step=None)}
            model = perturbed(kind, preset, **kw)
            out[f"{key}/state_dict"] = [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
            x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                out[f"{key}/eval"] = model.eval()(x)
            if not preset.endswith("tiny") or kind in ("unet", "nodestack"):
                continue
            for layout in ("nchw", "channels_last"):
                model = perturbed(kind, preset).train()
                xi = x[:, :, :24, :24]
                if layout == "channels_last":
                    model.to(memory_format=torch.channels_last)
                    xi = xi.contiguous(memory_format=torch.channels_last)
                y = model(xi)
                y.pow(2).mean().backward()
                out[f"{key}/{layout}/train"] = y.detach()
                out[f"{key}/{layout}/nfe"] = (model.nfe_forward, model.nfe_backward)
                for n, p in model.named_parameters():
                    if p.grad is not None:
                        out[f"{key}/{layout}/grad/{n}"] = p.grad
    torch.save(out, path)


def _run_dump(tree: Path, path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--dump", str(path)], env=env, check=True,
                   cwd=tree)


def compare(ref: str) -> list[str]:
    """The keys whose values differ between ``ref`` and the working tree (empty: the same)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "ref"
        old.mkdir()
        archive = subprocess.run(["git", "archive", ref, "nodeseg"], cwd=REPO, check=True, capture_output=True)
        tar_path = Path(tmp) / "ref.tar"
        tar_path.write_bytes(archive.stdout)
        with tarfile.open(tar_path) as tar:
            tar.extractall(old, filter="data")
        _run_dump(old, Path(tmp) / "old.pt")
        _run_dump(REPO, Path(tmp) / "new.pt")
        a, b = torch.load(Path(tmp) / "old.pt"), torch.load(Path(tmp) / "new.pt")
    bad = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        if not same:
            bad.append(key)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="HEAD", help="the git ref to compare the working tree with")
    parser.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dump is not None:
        dump(args.dump)
        return 0
    bad = compare(args.ref)
    if bad:
        print(f"2-D outputs differ from {args.ref}: {len(bad)} entries, first: {', '.join(bad[:5])}")
        return 1
    print(f"2-D outputs bit-identical to {args.ref} (state_dicts, eval forwards, NCHW and channels-last "
          "training gradients and NFE of every 2-D preset)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
