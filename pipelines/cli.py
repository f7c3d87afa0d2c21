"""``python -m pipelines.<name> compile | submit | local``: the command line every pipeline module shares.

``compile`` writes the YAML beside the pipeline source; ``submit`` sends that YAML to Kubeflow Pipelines
(``kfp.Client``; host and namespace from the flags or ``KFP_HOST`` / ``KFP_NAMESPACE``); ``local`` runs the
same graph on this machine with ``kfp.local`` (subprocesses, no containers).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from components.config import ARTIFACT_ROOTS, Cluster
from pipelines.definition import PipelineDef

HOST_ENV = "KFP_HOST"
NAMESPACE_ENV = "KFP_NAMESPACE"


@dataclass(frozen=True)
class SubmitRequest:
    """What ``submit`` hands to kfp: ``kfp.Client(**client)`` then ``create_run_from_pipeline_package(**run)``."""

    client: dict[str, Any]
    run: dict[str, Any] = field(default_factory=dict)


def check_pipeline_root(pipeline_root: str | None, cluster: Cluster) -> None:
    """The launcher mounts the data volume where KFP keeps artifacts for the compiled root's scheme; a
    pipeline root of another scheme would put them elsewhere."""
    if pipeline_root is None:
        return
    scheme = urlparse(pipeline_root).scheme
    if ARTIFACT_ROOTS.get(scheme) != cluster.artifact_root:
        valid = [k for k, v in ARTIFACT_ROOTS.items() if v == cluster.artifact_root]
        raise ValueError(
            f"--pipeline-root {pipeline_root!r}: the pipeline was compiled for {', '.join(f'{v}://' for v in valid)}"
            f" roots (artifacts under {cluster.artifact_root}); recompile with --artifact-root"
            f" {ARTIFACT_ROOTS.get(scheme, '<one of ' + ', '.join(ARTIFACT_ROOTS.values()) + '>')}"
        )


def submit_request(pipeline: PipelineDef, args: argparse.Namespace, env: dict[str, str] | None = None) -> SubmitRequest:
    """The kfp.Client call for ``submit``'s arguments; the run's namespace is also the PyTorchJobs' namespace
    unless ``--set namespace=...`` says otherwise."""
    env = dict(os.environ if env is None else env)
    host = args.host or env.get(HOST_ENV)
    namespace = args.namespace or env.get(NAMESPACE_ENV)
    if not host:
        raise ValueError(f"no Kubeflow Pipelines host: pass --host URL or set {HOST_ENV}")
    if not namespace:
        raise ValueError(f"no namespace: pass --namespace NS or set {NAMESPACE_ENV}")
    arguments = pipeline.arguments(args.set or [])
    if "namespace" in {p.name for p in pipeline.parameters()}:
        arguments.setdefault("namespace", namespace)
    check_pipeline_root(args.pipeline_root, Cluster(artifact_root=args.artifact_root))
    package = Path(args.package or pipeline.package)
    if not package.is_file():
        raise ValueError(f"--package {str(package)!r}: no such file (run `python -m pipelines.<name> compile`)")
    run = {
        "pipeline_file": str(package),
        "arguments": arguments,
        "run_name": args.run_name,  # None: kfp names it after the pipeline and the time
        "experiment_name": args.experiment,
        "namespace": namespace,
        "pipeline_root": args.pipeline_root,
        "enable_caching": False if args.no_cache else None,
        "service_account": args.service_account,
    }
    return SubmitRequest(client={"host": host, "namespace": namespace}, run=run)


def submit(request: SubmitRequest, client_factory: Callable[..., Any] | None = None) -> Any:
    """Create the run; returns kfp's ``RunPipelineResult``."""
    if client_factory is None:
        import kfp

        client_factory = kfp.Client
    return client_factory(**request.client).create_run_from_pipeline_package(**request.run)


def run_local(pipeline: PipelineDef, arguments: dict[str, Any], pipeline_root: Path) -> Path:
    """Run the pipeline with ``kfp.local`` (one subprocess per step, this interpreter); returns its folder."""
    from kfp import local

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.iterdir())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    pipeline.build(local=True)(**arguments)
    created = sorted(set(pipeline_root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    if not created:
        raise RuntimeError(f"kfp.local wrote nothing under {pipeline_root}")
    return created[-1]


def build_parser(pipeline: PipelineDef) -> argparse.ArgumentParser:
    """``compile``, ``submit`` and ``local`` for ``pipeline``."""
    names = ", ".join(f"{o.name} ({o.help})" for o in pipeline.options)
    parser = argparse.ArgumentParser(
        prog=f"python -m pipelines.{pipeline.package.stem}",
        description=f"{pipeline.description} Pipeline options: {names}; and every params.yaml key"
                    " (--set refine.lr=5e-4).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="write the compiled pipeline YAML")
    comp.add_argument("--output", type=Path, default=None, help=f"default: {pipeline.package.name} beside the source")
    roots = sorted(set(ARTIFACT_ROOTS.values()))
    comp.add_argument("--artifact-root", choices=roots, default=Cluster().artifact_root,
                      help="where KFP keeps artifacts inside a step: /minio for minio:// pipeline roots (KFP's"
                           " default), /s3 for s3://, /gcs for gs://; the launcher mounts the data volume there")
    sets = {"action": "append", "metavar": "KEY=VALUE", "help": "a pipeline parameter or params key (repeatable)"}
    run = sub.add_parser("submit", help="start a run on Kubeflow Pipelines")
    run.add_argument("--host", default=None, help=f"KFP API endpoint (default ${HOST_ENV})")
    run.add_argument("--namespace", default=None, help=f"KFP namespace of the run (default ${NAMESPACE_ENV})")
    run.add_argument("--experiment", default=None)
    run.add_argument("--run-name", default=None)
    run.add_argument("--pipeline-root", default=None, help="artifact root URI (default: the KFP installation's)")
    run.add_argument("--service-account", default=None,
                     help="Kubernetes service account of the run's pods (default: KFP's pipeline runner)")
    run.add_argument("--package", default=None, help="compiled YAML (default: the one beside the source)")
    run.add_argument("--artifact-root", choices=roots, default=Cluster().artifact_root,
                     help="the --artifact-root the package was compiled with")
    run.add_argument("--no-cache", action="store_true", help="run every step, even when a cached result exists")
    run.add_argument("--set", **sets)
    loc = sub.add_parser("local", help="run the same graph here with kfp.local (no cluster, no containers)")
    loc.add_argument("--pipeline-root", type=Path, default=Path("local_outputs"))
    loc.add_argument("--set", **sets)
    return parser


def main(pipeline: PipelineDef, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.<name>``; returns the exit status."""
    args = build_parser(pipeline).parse_args(argv)
    try:
        if args.command == "compile":
            print(pipeline.compile(args.output, Cluster(artifact_root=args.artifact_root)))
        elif args.command == "submit":
            result = submit(submit_request(pipeline, args))
            print(f"run {getattr(result, 'run_id', result)} submitted")
        else:
            print(run_local(pipeline, pipeline.arguments(args.set or []), args.pipeline_root))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
