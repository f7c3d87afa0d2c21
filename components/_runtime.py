"""The command line of a stage step, and how the local stand-ins run it.

:func:`stage_argv` builds the arguments after ``nodeseg <stage>`` from a step's inputs: for a container
component the inputs are KFP placeholders (the argv is then the ContainerSpec's args); for a local
component they are real paths and values. So both kinds run the same command line.

kfp copies the source of :func:`stage_argv`, :func:`run_local` and :func:`run_local_launch` into each
local (lightweight) component, so they are self-contained: plain data in, imports inside.
"""

from __future__ import annotations

from typing import Any


def stage_argv(spec: dict, values: dict) -> list:
    """``--flag path`` for each port with a flag, options, the base params file and ``--set key=value``.

    ``spec`` is a :meth:`components.stages.StageSpec.plain` mapping; ``values`` maps the component's input
    and output names to artifacts (anything with ``.path``), placeholders or plain values.
    """
    import json

    def text(value: Any) -> str:
        if isinstance(value, str):
            return value
        if value is None or isinstance(value, (bool, int, float, list, dict)):
            return json.dumps(integral(value))
        return str(value)  # a KFP placeholder renders itself

    def integral(value: Any) -> Any:
        # kfp.local hands list items over as floats (protobuf numbers): 128.0 goes back to 128
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, list):
            return [integral(v) for v in value]
        if isinstance(value, dict):
            return {k: integral(v) for k, v in value.items()}
        return value

    argv: list = []
    for name, flag, suffix in spec["ports"]:
        if flag:
            argv += [flag, f"{getattr(values[name], 'path', values[name])}{suffix}"]
    argv += spec["flags"]
    for name, flag in spec["options"]:
        argv += [flag, text(values[name])]
    if spec["params_file"]:
        argv += ["--params", spec["params_file"]]
    for key, name in spec["params"]:
        argv += ["--set", f"{key}={text(values[name])}"]
    for key, value in spec["fixed"]:
        argv += ["--set", f"{key}={value}"]
    return argv


def run_local(spec: dict, values: dict) -> None:
    """Run ``nodeseg <stage>`` in this process (what the container step runs), raising on failure."""
    from nodeseg.cli import main

    argv = [spec["stage"], *stage_argv(spec, values)]
    code = main(argv)
    if code:
        raise RuntimeError(f"nodeseg {spec['stage']} exited with status {code}")


def run_local_launch(spec: dict, values: dict) -> None:
    """The local stand-in of the PyTorchJob launcher: ``torchrun`` with Master + ``ddp_workers`` processes here.

    Writes the outcome (as the launcher's ``--outcome-json`` does) to ``values['outcome']``; raises when
    the run fails.
    """
    import json
    import os
    import subprocess
    import sys
    import time

    nproc = int(values["ddp_workers"]) + 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", "nodeseg", spec["stage"], *stage_argv(spec, values)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.monotonic()
    code = subprocess.run(cmd, env=env, check=False).returncode
    state = "Succeeded" if code == 0 else "Failed"
    outcome = {"name": f"local-torchrun-{spec['stage']}", "namespace": "", "state": state,
               "reason": "" if code == 0 else f"ExitCode{code}", "message": " ".join(cmd[:8]) + " ...",
               "elapsed_s": time.monotonic() - start, "deleted": False, "diagnostics": ""}
    with open(values["outcome"], "w", encoding="utf-8") as fh:
        json.dump(outcome, fh, indent=2)
    if code:
        raise RuntimeError(f"torchrun of nodeseg {spec['stage']} ({nproc} processes) exited with status {code}")
