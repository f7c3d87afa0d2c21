"""`nodeseg <stage>`: parse and check the command line, then call the stage's one typed function.

Every orchestrator (dvc repro, a Kubeflow component, a PyTorchJob pod, a test) comes through here. Paths may be
local or ``s3://bucket/prefix``: inputs are fetched and outputs published by :mod:`nodeseg.storage`, so the
stage functions only ever see local folders.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nodeseg import __version__
from nodeseg.errors import NodesegError, Terminated, shown, sigterm_raises
from nodeseg.malloc import tune_malloc
from nodeseg.tuning import DEFAULT_STUDY

log = logging.getLogger("nodeseg")

#: stage name → (inputs, outputs): the path arguments that are staged from and to S3
_PATHS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "generate": ((), ("out",)),
    "preprocess": (("raw",), ("out",)),
    "pretrain": (("shards",), ("out",)),
    "select": (("run",), ("out",)),
    "refine": (("shards", "unet"), ("out",)),
    "image-evolve": (("shards",), ("out",)),
    "evaluate": (("shards", "unet", "contour", "image"), ("out",)),
    "register": (("eval",), ()),
    "predict": (("input",), ("output",)),
    "tune": (("shards", "unet"), ("out",)),
}
#: training outputs hold checkpoints to resume from, so an s3:// output is fetched before the stage runs
_RESUMABLE = {"pretrain", "refine", "image-evolve"}


def _params(args: argparse.Namespace) -> Any:
    from nodeseg.params import load_params

    return load_params(args.params or ["params.yaml"], args.set or [])


def _run_generate(a: argparse.Namespace) -> None:
    from nodeseg.stages.generate import generate

    generate(a.out, _params(a))


def _run_preprocess(a: argparse.Namespace) -> None:
    from nodeseg.stages.preprocess import preprocess

    preprocess(a.raw, a.out, _params(a))


def _run_pretrain(a: argparse.Namespace) -> None:
    from nodeseg.stages.pretrain import pretrain

    pretrain(a.shards, a.out, _params(a))


def _run_select(a: argparse.Namespace) -> None:
    from nodeseg.stages.select import select_checkpoint

    select_checkpoint(a.run, a.out, _params(a).select)


def _run_refine(a: argparse.Namespace) -> None:
    from nodeseg.stages.refine import refine

    refine(a.shards, a.unet, a.out, _params(a))


def _run_image_evolve(a: argparse.Namespace) -> None:
    from nodeseg.stages.image_evolve import image_evolve

    image_evolve(a.shards, a.out, _params(a))


def _run_evaluate(a: argparse.Namespace) -> None:
    from nodeseg.stages.evaluate import evaluate

    models = {k: getattr(a, k) for k in ("unet", "contour", "image") if getattr(a, k) is not None}
    if not models:
        raise NodesegError("evaluate: give at least one of --unet, --contour, --image")
    evaluate(a.shards, models, a.out, _params(a))


def _run_register(a: argparse.Namespace) -> None:
    from nodeseg.stages.register import register

    register(a.eval, _params(a))


def _run_predict(a: argparse.Namespace) -> None:
    from nodeseg.stages.predict import predict

    predict(a.model, a.input, a.output, batch_size=a.batch_size)


def _run_tune(a: argparse.Namespace) -> None:
    from nodeseg.stages.tune import tune

    if a.phase in ("all", "optimize") and (a.shards is None or a.unet is None):
        raise NodesegError(f"tune --phase {a.phase}: --shards and --unet are required (they train the trials)")
    tune(a.shards, a.unet, a.out, _params(a), storage=a.storage, study_name=a.study_name, workers=a.workers,
         n_trials=a.n_trials, worker_index=a.worker_index, phase=a.phase, write_params=a.write_params)


_RUNNERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "generate": _run_generate,
    "preprocess": _run_preprocess,
    "pretrain": _run_pretrain,
    "select": _run_select,
    "refine": _run_refine,
    "image-evolve": _run_image_evolve,
    "evaluate": _run_evaluate,
    "register": _run_register,
    "predict": _run_predict,
    "tune": _run_tune,
}

_HELP = {
    "generate": "write phantom CT cases in the KiTS19 layout (the embedded default data)",
    "preprocess": "raw cases or a saliency folder -> parquet shards",
    "pretrain": "train the UNet to regress the signed distance map (DDP under torchrun)",
    "select": "keep the UNet checkpoint with the lowest loss on the first validation samples",
    "refine": "train Contour Evolution on the frozen, selected UNet (DDP under torchrun)",
    "image-evolve": "train Image Evolution (DDP under torchrun)",
    "evaluate": "IoU, adaptive and weighted F-beta, NFE; figures; MLflow registry",
    "register": "register evaluated models in MLflow and decide the champion alias",
    "predict": "segment a NIfTI volume or an image folder with a checkpoint or a registered model",
    "tune": "Optuna study of the refine solver (tolerance vs NFE); writes the chosen solver into params",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every stage."""
    parser = argparse.ArgumentParser(prog="nodeseg", description="Neural-ODE level-set segmentation pipeline.")
    parser.add_argument("--version", action="version", version=f"nodeseg {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")

    def stage(name: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=_HELP[name], description=_HELP[name])
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        if name != "predict":
            p.add_argument("--params", action="append", metavar="FILE",
                           help="params file (repeatable; later files win). Default: params.yaml")
            p.add_argument("--set", action="append", metavar="KEY=VALUE",
                           help="override one params key, e.g. --set refine.lr=1e-4 (repeatable)")
        return p

    stage("generate").add_argument("--out", required=True, help="folder for the case_XXXXX folders")
    p = stage("preprocess")
    p.add_argument("--raw", required=True, help="KiTS19 root (case_XXXXX folders) or saliency dataset folder")
    p.add_argument("--out", required=True, help="shards folder")
    for name in ("pretrain", "image-evolve"):
        p = stage(name)
        p.add_argument("--shards", required=True)
        p.add_argument("--out", required=True, help="run folder: checkpoints/, logs")
    p = stage("select")
    p.add_argument("--run", required=True, help="the pretrain run folder")
    p.add_argument("--out", required=True)
    p = stage("refine")
    p.add_argument("--shards", required=True)
    p.add_argument("--unet", required=True, help="the selected UNet checkpoint")
    p.add_argument("--out", required=True)
    p = stage("evaluate")
    p.add_argument("--shards", required=True)
    for k in ("unet", "contour", "image"):
        p.add_argument(f"--{k}", help=f"{k} checkpoint")
    p.add_argument("--out", required=True)
    stage("register").add_argument("--eval", required=True, help="the evaluate output folder")
    p = stage("predict")
    p.add_argument("--model", required=True, help="checkpoint file or MLflow URI (models:/nodeseg@champion)")
    p.add_argument("--input", required=True, help="NIfTI volume or folder of images")
    p.add_argument("--output", required=True, help="label volume (.nii.gz) or folder of masks")
    p.add_argument("--batch-size", type=int, default=8)
    p = stage("tune")
    p.add_argument("--shards", help="shards folder (phases all, optimize)")
    p.add_argument("--unet", help="the selected UNet checkpoint (phases all, optimize)")
    p.add_argument("--out", required=True, help="report folder; trial logs under trials/")
    p.add_argument("--storage", help="sqlite:///FILE, postgresql://..., FILE.db, journal:FILE or FILE.log "
                                     "(default: sqlite:///OUT/study.db)")
    p.add_argument("--study-name", default=DEFAULT_STUDY)
    p.add_argument("--phase", choices=("all", "create", "optimize", "report"), default="all",
                   help="all: create, optimize, report; on a cluster run them as separate tasks")
    p.add_argument("--workers", type=int, default=1, help="local worker processes joining the study")
    p.add_argument("--worker-index", type=int, default=0,
                   help="index of this call's first worker (sampler seed = seed + index); distinct per task")
    p.add_argument("--n-trials", type=int, help="trials this call runs over its workers (default: tune.n_trials)")
    p.add_argument("--write-params", type=Path, metavar="FILE",
                   help="write the chosen solver into contour.solver of FILE (e.g. params.yaml)")
    return parser


def _stage_paths(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    """Replace s3:// arguments by local folders: inputs fetched now, outputs published when the stage succeeds."""
    from nodeseg import storage

    inputs, outputs = _PATHS[args.stage]
    for name in inputs:
        value = getattr(args, name, None)
        if value is not None:
            setattr(args, name, Path(stack.enter_context(storage.staged_input(value))))
    publish = os.environ.get("RANK", "0") in ("", "0")  # under torchrun only rank 0 writes, so only it uploads
    for name in outputs:
        value = getattr(args, name, None)
        if value is not None:
            resume = args.stage in _RESUMABLE
            setattr(args, name, Path(stack.enter_context(storage.staged_output(value, resume=resume,
                                                                               publish=publish))))


class _EscapedFormatter(logging.Formatter):
    """Log lines with control characters escaped (a logged path or name cannot forge terminal output); a
    traceback, appended after the message, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return shown(super().formatMessage(record))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nodeseg`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EscapedFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    for noisy in ("botocore", "urllib3", "alembic", "mlflow", "git", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # nibabel logs a header problem (e.g. an unsupported datatype) on stderr before raising it; the raise becomes
    # the one error line
    logging.getLogger("nibabel").setLevel(logging.CRITICAL)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    try:
        tune_malloc()
        with contextlib.ExitStack() as stack:
            stack.enter_context(sigterm_raises())
            _stage_paths(args, stack)
            _RUNNERS[args.stage](args)
    except (NodesegError, ValueError, OSError) as err:
        # NodesegError: bad input, config, runaway solve; ValueError: a checked argument (check_arg);
        # OSError: a local path that cannot be read or written (permissions, a file where a folder goes, disk full)
        if args.verbose:
            log.exception("%s failed", args.stage)
        text, code = str(err), getattr(err, "exit_code", 2)
        if isinstance(err, OSError) and not isinstance(err, NodesegError):
            if err.filename and err.strerror:
                text = f"{shown(err.filename)}: {err.strerror}"
                if isinstance(err, FileExistsError) and Path(err.filename).is_file():
                    text += ": a file is in the way of a folder; choose another path"
            code = 4
        # one line: whitespace runs (a multi-line library message) become one space; any control character left
        # (a name that reached the message unquoted) is shown escaped, never sent to the terminal
        print(f"nodeseg {args.stage}: error: {shown(' '.join(text.split()))}", file=sys.stderr)
        return code
    except Terminated as err:
        resume = "; run the same command again to resume from the last checkpoint" if args.stage in _RESUMABLE else ""
        print(f"nodeseg {args.stage}: stopped by {err}{resume}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print(f"nodeseg {args.stage}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not type(err).__module__.startswith("mlflow"):  # MLflow's errors: server unreachable, bad store URI
            raise
        if args.verbose:
            log.exception("%s failed", args.stage)
        from nodeseg.tracking import tracking_uri

        first = " ".join(str(err).split())[:300]
        print(f"nodeseg {args.stage}: error: MLflow at {shown(tracking_uri())}: {shown(first)}", file=sys.stderr)
        return 5
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
