"""Submit a PyTorchJob, follow its conditions to Succeeded/Failed, report why, clean up.

The launcher talks to the API server through three ``CustomObjectsApi`` methods (create, get, delete)
and, for the post-mortem of a failed job, a ``CoreV1Api`` (events, pods, logs). Both come from the
in-cluster config, else the kubeconfig, unless the caller passes them.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from nodeseg.errors import NodesegError, check_arg
from nodeseg.kube.job import API_VERSION, CONTAINER_NAME, KIND, is_dns1123_label
from nodeseg.kube.validate import check_roundtrip, check_wiring

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "pytorchjobs"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # set by the operator on the job's pods
DELETE_POLICIES = ("always", "on-success", "never")

DeletePolicy = Literal["always", "on-success", "never"]
State = Literal["Succeeded", "Failed", "TimedOut", "Submitted"]

log = logging.getLogger("nodeseg.kube")


class LaunchError(NodesegError, RuntimeError):
    """The job could not be created (exists already, no CRD, no permission, invalid) or no cluster is configured."""


@dataclass(frozen=True)
class JobOutcome:
    """How a launch ended: the terminal state, the operator's reason and message, and what was cleaned up."""

    name: str
    namespace: str
    state: State
    reason: str = ""
    message: str = ""
    elapsed_s: float = 0.0
    deleted: bool = False
    diagnostics: str = ""

    @property
    def ok(self) -> bool:
        """True when the job succeeded or was only submitted (``wait=False``)."""
        return self.state in ("Succeeded", "Submitted")

    def summary(self) -> str:
        """One line: ``PyTorchJob ns/name Failed after 12 s: reason: message``."""
        why = ": ".join(p for p in (self.reason, self.message) if p)
        tail = f" ({'deleted' if self.deleted else 'kept'})" if self.state != "Submitted" else ""
        return f"PyTorchJob {self.namespace}/{self.name} {self.state} after {self.elapsed_s:.0f} s{': ' + why if why else ''}{tail}"


def _status_code(err: BaseException) -> int | None:
    return getattr(err, "status", None) if type(err).__name__ == "ApiException" else None


def _api_message(err: BaseException) -> str:
    body = getattr(err, "body", None)
    if body:
        try:
            return str(json.loads(body).get("message") or body)
        except (ValueError, AttributeError):
            return str(body)
    return str(getattr(err, "reason", "") or err)


def load_apis() -> tuple[Any, Any]:
    """``(CustomObjectsApi, CoreV1Api)`` from the in-cluster config, else the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, FileNotFoundError, TypeError) as err:
            raise LaunchError(
                f"no Kubernetes configuration: not inside a cluster and no usable kubeconfig ($KUBECONFIG or ~/.kube/config): {err}"
            ) from None
    return client.CustomObjectsApi(), client.CoreV1Api()


def terminal_condition(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The last condition with status True among Succeeded/Failed, or None while the job runs."""
    conditions = (job.get("status") or {}).get("conditions") or []
    found = None
    for c in conditions:
        if c.get("type") in ("Succeeded", "Failed") and str(c.get("status")) == "True":
            found = c
    return found


def _latest_condition(job: Mapping[str, Any]) -> dict[str, Any] | None:
    conditions = [
        c for c in (job.get("status") or {}).get("conditions") or [] if str(c.get("status")) == "True"
    ]
    return conditions[-1] if conditions else None


def collect_diagnostics(
    core_api: Any, namespace: str, name: str, *, tail_lines: int = 40, max_events: int = 15
) -> str:
    """The job's recent events, its pods' states and the tail of each pod's log, as text; never raises."""
    if core_api is None:
        return "(no CoreV1Api: events and logs not collected)"
    lines: list[str] = []

    def events_for(obj: str) -> list[str]:
        try:
            items = core_api.list_namespaced_event(
                namespace, field_selector=f"involvedObject.name={obj}"
            ).items
        except Exception as err:  # diagnostics must not hide the outcome
            return [f"  (events of {obj} unreadable: {_api_message(err)})"]
        items = sorted(
            items, key=lambda e: str(e.last_timestamp or e.event_time or e.metadata.creation_timestamp or "")
        )
        return [f"  {e.type} {e.reason}: {e.message}" for e in items[-max_events:]]

    lines.append(f"events of pytorchjob/{name}:")
    lines += events_for(name)
    try:
        pods = core_api.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={name}").items
    except Exception as err:
        lines.append(f"(pods of {name} unreadable: {_api_message(err)})")
        return "\n".join(lines)
    for pod in pods:
        pod_name = pod.metadata.name
        states = []
        for cs in (pod.status.container_statuses or []) if pod.status else []:
            term = cs.state.terminated if cs.state else None
            last = cs.last_state.terminated if cs.last_state else None
            t = term or last
            if t is not None:
                states.append(f"{cs.name} exit {t.exit_code} {t.reason or ''}".strip())
            elif cs.state and cs.state.waiting:
                states.append(f"{cs.name} waiting {cs.state.waiting.reason or ''}".strip())
            states.append(f"restarts {cs.restart_count}")
        phase = pod.status.phase if pod.status else "?"
        lines.append(f"pod {pod_name}: {phase}{'; ' + ', '.join(states) if states else ''}")
        lines += events_for(pod_name)
        try:
            text = core_api.read_namespaced_pod_log(
                pod_name, namespace, container=CONTAINER_NAME, tail_lines=tail_lines
            )
            lines.append(f"  last {tail_lines} log lines of {pod_name}:")
            lines += [f"    {line}" for line in str(text).splitlines()]
        except Exception as err:
            lines.append(f"  (log of {pod_name} unreadable: {_api_message(err)})")
    return "\n".join(lines)


def _delete(api: Any, namespace: str, name: str) -> bool:
    try:
        api.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
        )
    except Exception as err:
        if _status_code(err) == 404:
            return True
        log.warning("could not delete PyTorchJob %s/%s: %s", namespace, name, _api_message(err))
        return False
    log.info("deleted PyTorchJob %s/%s", namespace, name)
    return True


def _create(api: Any, namespace: str, job: dict[str, Any]) -> None:
    name = job["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    except Exception as err:
        code = _status_code(err)
        if code is None:
            raise LaunchError(
                f"cannot create PyTorchJob {namespace}/{name}: API server unreachable: {err}"
            ) from None
        hint = {
            409: "pick another name or delete it: kubectl delete pytorchjob -n {ns} {name}",
            404: "this cluster does not serve kubeflow.org/v1 pytorchjobs: install the Kubeflow training operator",
            403: "the service account may not create pytorchjobs.kubeflow.org here (see k8s/base/rbac.yaml)",
        }.get(code, "the API server refused it")
        raise LaunchError(
            f"cannot create PyTorchJob {namespace}/{name} (HTTP {code}): {_api_message(err)}; {hint.format(ns=namespace, name=name)}"
        ) from None
    log.info("created PyTorchJob %s/%s", namespace, name)


def launch(
    job: Mapping[str, Any],
    *,
    namespace: str,
    wait: bool = True,
    timeout_s: float = 24 * 3600.0,
    delete: DeletePolicy = "on-success",
    api: Any = None,
    core_api: Any = None,
    poll_s: float = 15.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> JobOutcome:
    """Create ``job`` in ``namespace``; with ``wait``, poll it until Succeeded, Failed or ``timeout_s``.

    ``delete``: ``always`` removes the job at the end (a timed-out one too, which stops it),
    ``on-success`` only after success (a failed job stays for inspection), ``never`` leaves it. If the
    wait is interrupted (KeyboardInterrupt, SIGTERM via the CLI), any policy but ``never`` deletes the job
    so no GPUs stay booked, then the interruption propagates. ``api``/``core_api`` default to clients from
    the cluster config; given ``api`` alone, failure diagnostics are skipped.
    """
    check_arg(isinstance(job, Mapping), "job", type(job).__name__, "a PyTorchJob mapping")
    check_arg(is_dns1123_label(namespace), "namespace", namespace, "a DNS-1123 label")
    check_arg(delete in DELETE_POLICIES, "delete", delete, f"one of {DELETE_POLICIES}")
    check_arg(
        wait or delete == "never",
        "delete",
        delete,
        "'never' when wait is False (the job would be deleted at once)",
    )
    check_arg(isinstance(timeout_s, (int, float)) and timeout_s > 0, "timeout_s", timeout_s, "a number > 0")
    check_arg(isinstance(poll_s, (int, float)) and poll_s > 0, "poll_s", poll_s, "a number > 0")
    body = json.loads(json.dumps(job))  # a private copy
    check_arg(
        body.get("apiVersion") == API_VERSION and body.get("kind") == KIND,
        "job",
        f"{body.get('apiVersion')}/{body.get('kind')}",
        f"a {API_VERSION} {KIND}",
    )
    meta = body.setdefault("metadata", {})
    name = meta.get("name")
    check_arg(isinstance(name, str) and bool(name), "job", meta, "metadata.name set")
    check_arg(
        meta.get("namespace") in (None, namespace),
        "namespace",
        namespace,
        f"the job's metadata.namespace ({meta.get('namespace')!r})",
    )
    meta["namespace"] = namespace
    check_roundtrip(body)
    check_wiring(body)
    if api is None:
        api, core_api = load_apis()

    start = clock()
    _create(api, namespace, body)
    if not wait:
        return JobOutcome(name, namespace, "Submitted", message="created; not waited for")

    last_seen: dict[str, Any] | None = None
    last_error = ""
    try:
        while True:
            try:
                current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            except Exception as err:
                if _status_code(err) == 404:
                    return JobOutcome(
                        name,
                        namespace,
                        "Failed",
                        reason="NotFound",
                        message="the PyTorchJob disappeared while being watched (deleted by someone else?)",
                        elapsed_s=clock() - start,
                        deleted=True,
                    )
                last_error = _api_message(err)  # transient: keep polling until the deadline
                log.warning("reading PyTorchJob %s/%s failed, retrying: %s", namespace, name, last_error)
                current = None
            if current is not None:
                latest = _latest_condition(current)
                if latest and (last_seen is None or latest.get("type") != last_seen.get("type")):
                    log.info(
                        "PyTorchJob %s/%s: %s %s",
                        namespace,
                        name,
                        latest.get("type"),
                        latest.get("message") or "",
                    )
                last_seen = latest or last_seen
                done = terminal_condition(current)
                if done is not None:
                    state: State = "Succeeded" if done["type"] == "Succeeded" else "Failed"
                    reason, message = str(done.get("reason") or ""), str(done.get("message") or "")
                    break
            elapsed = clock() - start
            if elapsed >= timeout_s:
                state, reason = "TimedOut", "Timeout"
                where = (
                    f"last condition {last_seen.get('type')}: {last_seen.get('message') or ''}".strip()
                    if last_seen
                    else "no condition reported yet"
                )
                message = f"not finished after {timeout_s:g} s ({where})" + (
                    f"; last API error: {last_error}" if last_error else ""
                )
                break
            sleep(min(poll_s, max(timeout_s - elapsed, 0.0)))
    except BaseException:
        if delete != "never":
            _delete(api, namespace, name)
        raise

    diagnostics = "" if state == "Succeeded" else collect_diagnostics(core_api, namespace, name)
    deleted = delete == "always" or (delete == "on-success" and state == "Succeeded")
    if deleted:
        deleted = _delete(api, namespace, name)
    return JobOutcome(name, namespace, state, reason, message, clock() - start, deleted, diagnostics)


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_cli_launch(
    launch_fn: Callable[..., JobOutcome],
    job: dict[str, Any],
    *,
    outcome_json: str | None,
    **kwargs: Any,
) -> int:
    """Run ``launch_fn`` for the CLI: log to stderr, turn SIGTERM into cleanup, print and save the outcome."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        outcome = launch_fn(job, **kwargs)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(outcome.summary(), file=sys.stderr)
    if outcome.diagnostics:
        print(outcome.diagnostics, file=sys.stderr)
    if outcome_json:
        with open(outcome_json, "w", encoding="utf-8") as fh:
            json.dump(asdict(outcome), fh, indent=2)
    return 0 if outcome.ok else 1
