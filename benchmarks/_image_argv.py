"""Run inside the nodeseg image by ``benchmarks/image_build.py``: parse every kfp step's command line.

    python _image_argv.py ARGV.json

ARGV.json is a list of ``{"executor", "command", "args"}`` taken from the compiled pipelines, placeholders
filled with sample values. Each command's program must be on the image's PATH, and its arguments must parse
with the image's own parsers: ``nodeseg <stage> ...`` with ``nodeseg``'s, the launcher
(``python -m nodeseg.kube.pytorchjob launch ... -- <stage args>``) with the launcher's, then its stage args
with ``nodeseg``'s. Only the installed package is imported (the image has no benchmarks/ or tests/). Prints
one JSON line: ``{"parsed": N, "failed": [...]}``; exits 1 if any failed.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys


def check(step: dict) -> str | None:
    """None when the step's program exists and its argv parses; else why not."""
    from nodeseg.cli import build_parser as nodeseg_parser
    from nodeseg.kube import pytorchjob

    command, args = step["command"], step["args"]
    if not shutil.which(command[0]):
        return f"{command[0]!r} is not on PATH"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if command[:3] == ["python", "-m", "nodeseg.kube.pytorchjob"]:
                cut = args.index("--")
                launch = pytorchjob.build_parser().parse_args([*command[3:], *args[:cut]])
                nodeseg_parser().parse_args([launch.stage, *args[cut + 1:]])
            elif command[0] == "nodeseg":
                nodeseg_parser().parse_args([*command[1:], *args])
            else:
                return f"unexpected command {command!r}"
    except SystemExit as exc:
        return f"exit {exc.code}: {err.getvalue().strip().splitlines()[-1:]}"
    return None


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        steps = json.load(f)
    failed = []
    for step in steps:
        why = check(step)
        if why:
            failed.append({"executor": step["executor"], "why": why})
    print(json.dumps({"parsed": len(steps) - len(failed), "failed": failed}))
    return 1 if failed or not steps else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
