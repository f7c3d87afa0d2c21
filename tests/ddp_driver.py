"""Test-only driver: run ``nodeseg <stage>`` (``nodeseg.cli.main``, what ``python -m nodeseg`` runs) and dump
every rank's trained model.

    torchrun ... tests/ddp_driver.py DUMP_DIR -- pretrain --shards ... --out ...
    python tests/ddp_driver.py DUMP_DIR -- pretrain ...                       # one process, the reference

The stages keep the model to themselves (rank 0 writes checkpoints, other ranks write nothing), so the
driver wraps the training loop the stages call: when ``fit`` returns, each rank saves
``DUMP_DIR/rank<RANK>.pt`` with the model's state_dict, the NFE of each training forward pass (Neural-ODE
models) and its world size.

``RANK1_SOLVER`` (JSON, e.g. ``{"first_step": null}``) changes the ODE solver settings of rank 1 only, so the
ranks' solvers take different numbers of steps on purpose; the parameters are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str]) -> int:
    """``DUMP_DIR -- <nodeseg argv>``; returns nodeseg's exit status."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: ddp_driver.py DUMP_DIR -- <stage> <args>", file=sys.stderr)
        return 2
    dump_dir, stage_argv = Path(argv[0]), argv[2:]
    dump_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    import nodeseg.stages._training as training
    from nodeseg.cli import main as nodeseg_main

    real_fit = training.fit

    def fit_and_dump(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        nfe: list[int] = []
        rank = int(os.environ.get("RANK", "0"))
        overrides = json.loads(os.environ.get("RANK1_SOLVER", "{}"))
        if rank == 1 and overrides:
            from nodeseg.solve import ODESolver

            model.solver = ODESolver(model.solver.func, dataclasses.replace(model.solver.config, **overrides))

        def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if module.training and hasattr(module, "nfe_forward"):
                nfe.append(int(module.nfe_forward))

        hook = model.register_forward_hook(record)
        try:
            result = real_fit(model, *args, **kwargs)
        finally:
            hook.remove()
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save({"state": state, "nfe": nfe, "world_size": int(os.environ.get("WORLD_SIZE", "1"))},
                   dump_dir / f"rank{rank}.pt")
        return result

    training.fit = fit_and_dump
    return nodeseg_main(stage_argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
