"""``python -m nodeseg.kube.pytorchjob``: render a DDP stage's PyTorchJob as YAML, or launch it and wait.

The job is built by :mod:`nodeseg.kube.job`; ``launch`` hands it to :mod:`nodeseg.kube.launcher`. This is the
command the pipeline's launcher component runs (``python -m nodeseg.kube.pytorchjob launch ... -- <stage args>``).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Sequence
from typing import Any

import yaml

from nodeseg.kube.job import (
    BACKENDS,
    DDP_STAGES,
    DEFAULT_CONFIG_MAPS,
    DEFAULT_MOUNT_PATH,
    DEFAULT_PORT,
    DEFAULT_PVC,
    DEFAULT_SECRETS,
    TAINT_EFFECTS,
    build_pytorchjob,
)
from nodeseg.kube.launcher import launch, run_cli_launch

__all__ = ["build_parser", "main"]


# ---- CLI ---------------------------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _toleration_arg(text: str) -> dict[str, str]:
    """``key[=value]:Effect`` (as kubectl taint writes it) or ``key`` alone (any effect)."""
    head, sep, effect = text.rpartition(":")
    if not sep:
        head, effect = text, ""
    key, eq, value = head.partition("=")
    if not key or (effect and effect not in TAINT_EFFECTS):
        raise argparse.ArgumentTypeError(
            f"expected KEY[=VALUE][:EFFECT] with EFFECT one of {TAINT_EFFECTS}, got {text!r}"
        )
    t = {"key": key, "operator": "Equal" if eq else "Exists"}
    if eq:
        t["value"] = value
    if effect:
        t["effect"] = effect
    return t


def _add_build_args(p: argparse.ArgumentParser, *, name_required: bool) -> None:
    p.add_argument(
        "--name",
        required=name_required,
        help="job name (DNS-1035); launch defaults to nodeseg-<stage>-<random>",
    )
    p.add_argument("--stage", required=True, choices=DDP_STAGES)
    p.add_argument("--image", required=True, help="image pinned by tag or digest")
    p.add_argument("--workers", type=int, default=1, help="Worker replicas besides the Master (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument(
        "--nproc-per-node", type=int, default=None, help="processes per node (default: one per GPU)"
    )
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: nccl with GPUs, gloo without")
    p.add_argument("--cpu-request", default="4")
    p.add_argument("--cpu-limit", default="8")
    p.add_argument("--memory-request", default="16Gi")
    p.add_argument("--memory-limit", default="32Gi")
    p.add_argument("--shm-size", default="2Gi")
    p.add_argument(
        "--pvc",
        default=DEFAULT_PVC,
        help=f"PVC for data and checkpoints (default {DEFAULT_PVC}); 'none' for none",
    )
    p.add_argument("--mount-path", default=DEFAULT_MOUNT_PATH)
    p.add_argument(
        "--env-from-secret",
        action="append",
        default=None,
        help=f"repeatable (default {list(DEFAULT_SECRETS)})",
    )
    p.add_argument(
        "--env-from-config-map",
        action="append",
        default=None,
        help=f"repeatable (default {list(DEFAULT_CONFIG_MAPS)})",
    )
    p.add_argument("--env", action="append", type=_key_value, default=[], metavar="KEY=VALUE")
    p.add_argument("--node-selector", action="append", type=_key_value, default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--toleration", action="append", type=_toleration_arg, default=[], metavar="KEY[=VALUE][:EFFECT]"
    )
    p.add_argument("--elastic-min-workers", type=int, default=None)
    p.add_argument("--elastic-max-workers", type=int, default=None)
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--backoff-limit", type=int, default=3)
    p.add_argument("--active-deadline-seconds", type=int, default=None)
    p.add_argument("--ttl-seconds-after-finished", type=int, default=None)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--label", action="append", type=_key_value, default=[], metavar="KEY=VALUE")


def _job_from_args(a: argparse.Namespace, stage_args: list[str], namespace: str | None) -> dict[str, Any]:
    name = a.name or f"nodeseg-{a.stage}-{uuid.uuid4().hex[:8]}"
    return build_pytorchjob(
        name,
        namespace=namespace,
        image=a.image,
        stage=a.stage,
        stage_args=stage_args,
        workers=a.workers,
        gpus_per_node=a.gpus_per_node,
        nproc_per_node=a.nproc_per_node,
        backend=a.backend or ("nccl" if a.gpus_per_node > 0 else "gloo"),
        cpu_request=a.cpu_request,
        cpu_limit=a.cpu_limit,
        memory_request=a.memory_request,
        memory_limit=a.memory_limit,
        shm_size=a.shm_size,
        pvc_name=None if a.pvc.lower() == "none" else a.pvc,
        mount_path=a.mount_path,
        env_from_secrets=DEFAULT_SECRETS if a.env_from_secret is None else a.env_from_secret,
        env_from_config_maps=DEFAULT_CONFIG_MAPS if a.env_from_config_map is None else a.env_from_config_map,
        env=dict(a.env),
        node_selector=dict(a.node_selector),
        tolerations=a.toleration,
        elastic_min_workers=a.elastic_min_workers,
        elastic_max_workers=a.elastic_max_workers,
        max_restarts=a.max_restarts,
        backoff_limit=a.backoff_limit,
        active_deadline_seconds=a.active_deadline_seconds,
        ttl_seconds_after_finished=a.ttl_seconds_after_finished,
        port=a.port,
        labels=dict(a.label),
    )


def build_parser() -> argparse.ArgumentParser:
    """``render`` prints the job as YAML; ``launch`` submits it and waits. Stage arguments follow ``--``."""
    parser = argparse.ArgumentParser(
        prog="python -m nodeseg.kube.pytorchjob",
        description="Run a DDP nodeseg stage as a Kubeflow PyTorchJob. Arguments after '--' go to the stage.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="print the PyTorchJob YAML")
    _add_build_args(render, name_required=True)
    render.add_argument("--namespace", default=None, help="omit for a namespace-agnostic manifest")
    launch = sub.add_parser("launch", help="create the PyTorchJob, wait for it, report and clean up")
    _add_build_args(launch, name_required=False)
    launch.add_argument("--namespace", required=True)
    launch.add_argument("--timeout-s", type=float, default=24 * 3600.0)
    launch.add_argument("--poll-s", type=float, default=15.0)
    launch.add_argument("--delete", choices=("always", "on-success", "never"), default="on-success")
    launch.add_argument("--no-wait", action="store_true", help="return once created (needs --delete never)")
    launch.add_argument("--outcome-json", default=None, help="also write the outcome here as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m nodeseg.kube.pytorchjob``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, stage_args = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    try:
        job = _job_from_args(args, stage_args, args.namespace)
        if args.command == "render":
            sys.stdout.write(yaml.safe_dump(job, sort_keys=False, width=120))
            return 0
        return run_cli_launch(
            launch,
            job,
            namespace=args.namespace,
            wait=not args.no_wait,
            timeout_s=args.timeout_s,
            poll_s=args.poll_s,
            delete=args.delete,
            outcome_json=args.outcome_json,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
