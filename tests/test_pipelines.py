"""Kubeflow pipelines: the committed YAML is current, every params.yaml key is a pipeline parameter, every
step runs ``nodeseg <stage>`` (or the launcher) with no embedded code, the cluster settings are in the
spec, ``submit`` builds a correct kfp.Client call, and the same graphs run here with ``kfp.local``.

No Kubeflow server can run here: the compiled spec is checked as data, the launcher's and the stages' command
lines are parsed by their real argument parsers, and the local runs execute every step for real.
"""

from __future__ import annotations

import inspect
import json
import re
import shlex
from pathlib import Path
from typing import Any

import kfp
import pytest
import yaml
from committed import PARAMS
from pipeline_params import TINY

from components import STAGES, container_component, local_component
from components.config import CONFIG_MAP_KEYS, DEFAULT_IMAGE, IMAGE_ENV, SECRET_KEYS, Cluster
from components.params import param_name, pipeline_params, stage_params
from components.stages import LAUNCH_COMMAND
from nodeseg.cli import build_parser as nodeseg_parser
from nodeseg.kube import pytorchjob
from nodeseg.params import RUNTIME_KEYS, load_params
from pipelines import training, tuning
from pipelines.cli import build_parser, check_pipeline_root, run_local, submit, submit_request
from pipelines.definition import PipelineDef

REPO = Path(__file__).resolve().parents[1]
PIPELINES = {"training": training.PIPELINE, "tuning": tuning.PIPELINE}
KFP_TYPES = {int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN", str: "STRING", list: "LIST",
             dict: "STRUCT"}
PLACEHOLDER = re.compile(r"\{\{\$\.(inputs|outputs)\.(parameters|artifacts)\['([^']+)'\]\.?(\w*)\}\}")


def _spec(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    pipeline_spec, platform = yaml.safe_load_all(PIPELINES[name].package.read_text())
    return pipeline_spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _executors(name: str) -> dict[str, dict[str, Any]]:
    """Executor name -> container, for the nodeseg steps (not the importers)."""
    spec, _ = _spec(name)
    return {k: v["container"] for k, v in spec["deploymentSpec"]["executors"].items() if "container" in v}


def _fill(arg: str) -> str:
    """A placeholder-bearing argument with sample values, as KFP would resolve it."""
    def value(m: re.Match[str]) -> str:
        where, kind, name, attr = m.groups()
        if kind == "artifacts":
            return f"/minio/mlpipeline/v2/artifacts/run/{name}"
        if attr == "output_file":
            return f"/tmp/outputs/{name}"
        return {"namespace": "nodeseg", "job_delete": "on-success", "job_timeout_s": "3600",
                "ddp_workers": "2", "storage": "sqlite:///study.db"}.get(name, "1")
    return PLACEHOLDER.sub(value, arg)


# ---- compiled YAML ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PIPELINES)
def test_compiled_yaml_is_up_to_date(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(IMAGE_ENV, raising=False)
    pipeline = PIPELINES[name]
    fresh = pipeline.compile(tmp_path / "fresh.yaml")
    assert fresh.read_text() == pipeline.package.read_text(), (
        f"{pipeline.package.relative_to(REPO)} is stale: run `python -m pipelines.{name} compile`")


def _file_leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaf keys of params.yaml as written (an empty mapping is a leaf)."""
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in _file_leaves(v, f"{prefix}{k}.")]
    return [(prefix[:-1], node)]


def _as_kfp_renders(value: Any) -> str:
    """A parameter value as KFP substitutes it into ``--set key={{...}}``: strings as they are, the rest as
    JSON with whole numbers without a fraction (protobuf numbers are doubles; Go's protojson writes 128.0
    as 128)."""
    def whole(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return [whole(x) for x in v] if isinstance(v, list) else {k: whole(x) for k, x in v.items()} \
            if isinstance(v, dict) else v
    return value if isinstance(value, str) else json.dumps(whole(value))


def _get(params: Any, key: str) -> Any:
    for part in key.split("."):
        params = getattr(params, part)
    return params


@pytest.mark.parametrize("name", PIPELINES)
def test_every_params_key_is_a_pipeline_parameter_with_its_default(name: str) -> None:
    """Each key of params.yaml (and each key it leaves to the dataclass defaults) is a pipeline parameter of
    the right type whose default, passed as ``--set key=default``, gives the committed value."""
    spec, _ = _spec(name)
    declared = spec["root"]["inputDefinitions"]["parameters"]
    committed = load_params([PARAMS])
    written = [k for k, _ in _file_leaves(yaml.safe_load(PARAMS.read_text()))]
    assert len(written) > 50
    missing = [k for k in written if param_name(k) not in declared]
    assert not missing, f"params.yaml keys that are not parameters of pipeline {name}: {missing}"
    keys = [p.key for p in pipeline_params()]
    assert set(written) <= set(keys)
    sets = []
    for p in pipeline_params():
        entry = declared[p.name]
        assert entry["parameterType"] == KFP_TYPES[p.type] and entry.get("isOptional") is True, p.key
        sets.append(f"{p.key}={_as_kfp_renders(entry['defaultValue'])}")
    # what a step gets with no base file (--params /dev/null) and every default as --set: params.yaml
    rebuilt = load_params([], sets)
    for key in keys:
        assert _get(rebuilt, key) == _get(committed, key), key
    assert rebuilt == committed


def test_pipeline_options_are_parameters_too() -> None:
    spec, _ = _spec("training")
    declared = spec["root"]["inputDefinitions"]["parameters"]
    assert "defaultValue" not in declared["raw_data"] and not declared["raw_data"].get("isOptional")
    assert declared["distributed"] == {"defaultValue": False, "isOptional": True, "parameterType": "BOOLEAN"}
    assert declared["namespace"]["defaultValue"] == "nodeseg"
    spec, _ = _spec("tuning")
    declared = spec["root"]["inputDefinitions"]["parameters"]
    assert declared["worker_indices"]["defaultValue"] == [0, 1, 2, 3]
    assert declared["storage"]["defaultValue"].startswith("postgresql+psycopg2://optuna@postgres:5432/")


@pytest.mark.parametrize("name", PIPELINES)
def test_every_step_runs_nodeseg_with_no_embedded_code(name: str) -> None:
    stages = {s.command for s in STAGES.values()}
    executors = _executors(name)
    assert executors
    for ex, c in executors.items():
        assert c["image"] == DEFAULT_IMAGE, ex
        assert c["command"] in [["nodeseg", s] for s in stages] + [LAUNCH_COMMAND], (ex, c["command"])
        for arg in c["args"]:
            assert "\n" not in arg and not re.search(r"\bimport\b|\bexec\(|python3? -c|sh -c", arg), (ex, arg)
        # each --set carries the input of the same name, or a fixed literal
        args = c["args"]
        for i, arg in enumerate(args):
            if arg == "--set":
                key, _, value = args[i + 1].partition("=")
                if key == "evaluate.register" and "evaluate" in ex:
                    assert value == "false"  # evaluate never registers: the register step does
                else:
                    assert value == f"{{{{$.inputs.parameters['{param_name(key)}']}}}}", (ex, args[i + 1])


@pytest.mark.parametrize("name", PIPELINES)
def test_step_command_lines_parse_with_the_real_parsers(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Resolved as KFP would, each step's argv parses with ``nodeseg``'s parser; the launcher's with the
    launcher's, and the job it renders mounts the data volume where KFP keeps artifacts."""
    for ex, c in _executors(name).items():
        args = [_fill(a) for a in c["args"]]
        if c["command"] == LAUNCH_COMMAND:
            cut = args.index("--")
            own, stage_args = args[:cut], args[cut + 1:]
            launch = pytorchjob.build_parser().parse_args(["launch", *own])
            assert (launch.namespace, launch.workers, launch.delete, launch.pvc, launch.mount_path) == (
                "nodeseg", 2, "on-success", "nodeseg-data", "/minio")
            nodeseg_parser().parse_args([launch.stage, *stage_args])
            render = [a for a in own if a not in ("on-success", "3600", "/tmp/outputs/outcome")
                      and a not in ("--delete", "--timeout-s", "--outcome-json")]
            assert pytorchjob.main(["render", "--name", "nodeseg-test", *render, "--", *stage_args]) == 0
            job = yaml.safe_load(capsys.readouterr().out)
            pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                      if "persistentVolumeClaim" in v}
            assert claims[mounts["/minio"]] == "nodeseg-data"
            assert "--shards" in stage_args and stage_args[stage_args.index("--shards") + 1].startswith("/minio/")
        else:
            parsed = nodeseg_parser().parse_args([c["command"][1], *args])
            assert parsed.params == ["/dev/null"] or c["command"][1] == "predict", ex


def test_each_step_gets_the_params_its_stage_reads() -> None:
    """dvc.yaml lists the params each stage's output depends on; the pipeline step of that stage gets exactly
    those keys and the runtime keys of their sections (data.workers, num_workers, log_every)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for dvc_name, stage in dvc.items():
        comp = container_component(dvc_name.replace("_", "-"))
        inputs = set(comp.component_spec.inputs)
        sections = {s.split(".")[0] for s in stage["params"]}
        runtime = {k for k in RUNTIME_KEYS if k.split(".")[0] in sections}
        wanted = {param_name(p.key) for p in pipeline_params()
                  if p.key in runtime or any(p.key == s or p.key.startswith(s + ".") for s in stage["params"])}
        if dvc_name == "evaluate":
            wanted.discard("evaluate__register")  # the pipeline registers in its own step
        params_inputs = {n for n in inputs if n in {p.name for p in pipeline_params()}}
        assert params_inputs == wanted, dvc_name
    pretrain = set(container_component("pretrain").component_spec.inputs)
    assert {"pretrain__lr", "unet__preset", "seed", "device"} <= pretrain and "refine__lr" not in pretrain
    assert {"pretrain__log_every", "pretrain__num_workers"} <= pretrain
    assert "data__workers" in container_component("preprocess").component_spec.inputs
    assert {p.key for p in stage_params("tune")} >= {"tune.n_trials", "contour.solver.first_step"}
    assert "contour.solver.atol" not in {p.key for p in stage_params("tune")}  # what tune writes


@pytest.mark.parametrize("stage,launcher", [(s, False) for s in STAGES] + [("pretrain", True), ("refine", True)])
def test_local_stand_ins_have_the_container_interfaces(stage: str, launcher: bool) -> None:
    c, loc = container_component(stage, launcher=launcher), local_component(stage, launcher=launcher)
    assert loc.name == c.name
    assert loc.component_spec.inputs == c.component_spec.inputs
    assert loc.component_spec.outputs == c.component_spec.outputs


def test_unknown_stage_and_non_ddp_launcher_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown stage 'trian': expected one of \["):
        container_component("trian")
    with pytest.raises(ValueError, match=r"stage 'select' does not run as a PyTorchJob: expected one of"):
        container_component("select", launcher=True)


# ---- Kubernetes settings ---------------------------------------------------------------------------------


def test_cluster_names_match_k8s_base() -> None:
    base = REPO / "k8s" / "base"
    assert yaml.safe_load((base / "pvc.yaml").read_text())["metadata"]["name"] == Cluster().pvc
    config = yaml.safe_load((base / "config.yaml").read_text())
    assert config["metadata"]["name"] == Cluster().config_map and tuple(config["data"]) == CONFIG_MAP_KEYS
    secrets = REPO / "k8s" / "overlays" / "gpu" / "secrets"
    keys = [line.split("=")[0] for line in (secrets / "s3.env.example").read_text().splitlines()
            if line and not line.startswith("#")]
    assert tuple(keys) == SECRET_KEYS
    assert Cluster().database_password_key in (secrets / "postgres.env.example").read_text()
    kustomization = (REPO / "k8s" / "overlays" / "gpu" / "kustomization.yaml").read_text()
    for name in (Cluster().secret, Cluster().database_secret):
        assert f"name: {name}" in kustomization


def test_training_spec_carries_gpus_scheduling_env_and_the_volume() -> None:
    spec, k8s = _spec("training")
    containers = _executors("training")
    c = Cluster()
    for ex, platform in k8s.items():
        envs = {e["envVar"] for s in platform["secretAsEnv"] for e in s["keyToEnv"]}
        assert {s["secretName"] for s in platform["secretAsEnv"]} == {c.secret} and envs == set(SECRET_KEYS)
        cm = platform["configMapAsEnv"][0]
        assert cm["configMapName"] == c.config_map and [e["envVar"] for e in cm["keyToEnv"]] == list(CONFIG_MAP_KEYS)
        stage = containers[ex]["command"][1] if containers[ex]["command"][0] == "nodeseg" else None
        if ex.endswith("-pytorchjob"):
            assert platform["pvcMount"] == [{"constant": c.pvc, "mountPath": "/minio",
                                             "pvcNameParameter": {"runtimeValue": {"constant": c.pvc}}}]
            assert "resources" not in containers[ex]  # the launcher asks for no GPU; its job's pods do
        elif stage in ("pretrain", "refine", "image-evolve"):
            assert platform["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
            assert platform["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
            assert containers[ex]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert containers[ex]["resources"]["accelerator"]["resourceCount"] == "1"
        else:
            assert "nodeSelector" not in platform and "resources" not in containers[ex], ex
    dag = json.dumps(spec["root"]["dag"])
    assert "pipelinechannel--distributed" in dag and "pipelinechannel--evaluate__register" in dag


def _all_tasks(spec: dict) -> list[tuple[str, dict]]:
    """(name, task) of every task in the root DAG and in the sub-DAGs of loops and conditions."""
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec.get("components", {}).values() if "dag" in c)]
    return [(name, task) for dag in dags for name, task in dag["tasks"].items()]


def test_tuning_spec_has_a_parallel_study_and_the_database_password() -> None:
    spec, k8s = _spec("tuning")
    tasks = spec["root"]["dag"]["tasks"]
    loop = next(t for t in tasks.values() if "parameterIterator" in t)
    assert loop["iteratorPolicy"] == {"parallelismLimit": 4}
    assert tasks["nodeseg-tune-report"]["dependentTasks"] == ["for-loop-1"]
    assert "nodeseg-tune-create" in tasks["for-loop-1"]["dependentTasks"]
    for ex in ("exec-nodeseg-tune-create", "exec-nodeseg-tune-optimize", "exec-nodeseg-tune-report"):
        db = [s for s in k8s[ex]["secretAsEnv"] if s["secretName"] == "postgres-credentials"]
        assert db[0]["keyToEnv"] == [{"envVar": "PGPASSWORD", "secretKey": "OPTUNA_DB_PASSWORD"}]
    # the study lives in the database: no tune step may be answered from KFP's cache
    study_tasks = [t for name, t in _all_tasks(spec) if name.startswith("nodeseg-tune-")]
    assert len(study_tasks) == 3 and all(t["cachingOptions"].get("enableCache") is not True for t in study_tasks)
    args = _executors("tuning")["exec-nodeseg-tune-optimize"]["args"]
    assert shlex.join(args[args.index("--phase"):args.index("--phase") + 4]) == "--phase optimize --workers 1"


# ---- arguments and submit --------------------------------------------------------------------------------


def test_arguments_take_params_keys_and_options_with_their_types() -> None:
    p = training.PIPELINE
    args = p.arguments(["raw_data=s3://nodeseg-data/raw/phantom", "refine.lr=5e-4", "pretrain__epochs=3",
                        "distributed=true", "phantom.shape=[64, 64]", "image.solver.first_step=null",
                        "device=on"])
    assert args == {"raw_data": "s3://nodeseg-data/raw/phantom", "refine__lr": 5e-4, "pretrain__epochs": 3,
                    "distributed": True, "phantom__shape": [64, 64], "image__solver__first_step": "null",
                    "device": "on"}


@pytest.mark.parametrize("items,message", [
    (["refine.lr=5e-4"], r"pipeline nodeseg-training: give raw_data=\.\.\."),
    (["raw_data=x", "refine.lrr=1"], r"'refine.lrr' is not a parameter of pipeline nodeseg-training; did you mean refine__lr"),
    (["raw_data=x", "pretrain.epochs=2.5"], r"pretrain__epochs='2.5': expected int, got float"),
    (["raw_data=x", "distributed=yes please"], r"distributed='yes please': expected bool, got str"),
    (["raw_data=x", "refine.lr"], r"expected KEY=VALUE, got 'refine.lr'"),
])
def test_bad_arguments_name_the_value_and_the_choices(items: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        training.PIPELINE.arguments(items)


def _submit_args(*argv: str) -> Any:
    return build_parser(training.PIPELINE).parse_args(["submit", *argv])


def test_submit_builds_the_kfp_client_call() -> None:
    args = _submit_args("--host", "http://kfp.example:8888", "--namespace", "team-a", "--experiment", "nodeseg",
                        "--run-name", "lr-sweep-1", "--pipeline-root", "minio://mlpipeline/nodeseg",
                        "--service-account", "nodeseg-launcher", "--no-cache",
                        "--set", "raw_data=minio://mlpipeline/raw", "--set", "refine.lr=5e-4")
    req = submit_request(training.PIPELINE, args, env={})
    assert req.client == {"host": "http://kfp.example:8888", "namespace": "team-a"}
    assert req.run == {
        "pipeline_file": str(training.PIPELINE.package),
        "arguments": {"raw_data": "minio://mlpipeline/raw", "refine__lr": 5e-4, "namespace": "team-a"},
        "run_name": "lr-sweep-1", "experiment_name": "nodeseg", "namespace": "team-a",
        "pipeline_root": "minio://mlpipeline/nodeseg", "enable_caching": False,
        "service_account": "nodeseg-launcher",
    }
    # the exact keyword arguments kfp.Client takes
    inspect.signature(kfp.Client).bind(**req.client)
    inspect.signature(kfp.Client.create_run_from_pipeline_package).bind(None, **req.run)

    class Recorder:
        def __init__(self, **kwargs: Any) -> None:
            self.calls = [("client", kwargs)]
            Recorder.last = self

        def create_run_from_pipeline_package(self, **kwargs: Any) -> str:
            self.calls.append(("run", kwargs))
            return "run-1"

    assert submit(req, client_factory=Recorder) == "run-1"
    assert Recorder.last.calls == [("client", req.client), ("run", req.run)]


def test_submit_reads_host_and_namespace_from_the_environment() -> None:
    args = _submit_args("--set", "raw_data=s3://b/raw", "--set", "namespace=jobs", "--artifact-root", "/s3",
                        "--pipeline-root", "s3://b/kfp")
    req = submit_request(training.PIPELINE, args, env={"KFP_HOST": "https://kfp", "KFP_NAMESPACE": "team-b"})
    assert req.client == {"host": "https://kfp", "namespace": "team-b"}
    assert req.run["arguments"]["namespace"] == "jobs" and req.run["enable_caching"] is None
    with pytest.raises(ValueError, match=r"no Kubeflow Pipelines host: pass --host URL or set KFP_HOST"):
        submit_request(training.PIPELINE, args, env={"KFP_NAMESPACE": "x"})
    with pytest.raises(ValueError, match=r"no namespace: pass --namespace NS or set KFP_NAMESPACE"):
        submit_request(training.PIPELINE, args, env={"KFP_HOST": "x"})


def test_a_pipeline_root_must_match_the_compiled_artifact_root() -> None:
    check_pipeline_root(None, Cluster())
    check_pipeline_root("minio://mlpipeline/v2/artifacts", Cluster())
    check_pipeline_root("s3://nodeseg-data/kfp", Cluster(artifact_root="/s3"))
    with pytest.raises(ValueError, match=r"'s3://nodeseg-data/kfp': the pipeline was compiled for minio:// roots"
                                         r" \(artifacts under /minio\); recompile with --artifact-root /s3"):
        check_pipeline_root("s3://nodeseg-data/kfp", Cluster())
    with pytest.raises(ValueError, match=r"artifact_root must be one of \['/gcs', '/minio', '/s3'\]"):
        Cluster(artifact_root="/mnt/nodeseg")


def test_cli_reports_a_bad_argument_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main

    assert main(training.PIPELINE, ["submit", "--host", "h", "--namespace", "n", "--set", "raw_data=x",
                                    "--set", "refine.lr=fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: refine__lr='fast': expected float, got str"


def test_image_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IMAGE_ENV, "registry.example/nodeseg:0.2.0")
    comp = container_component("select")
    assert comp.component_spec.implementation.container.image == "registry.example/nodeseg:0.2.0"


# ---- local runs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nodeseg.cli import main

    out = tmp_path_factory.mktemp("raw") / "phantom"
    assert main(["generate", "--params", str(PARAMS), "--out", str(out),
                 *[a for s in TINY for a in ("--set", s)]]) == 0
    return out


@pytest.fixture
def file_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An MLflow file store for the run: steps may run at once and log from several processes."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _local(pipeline: PipelineDef, root: Path, *items: str) -> Path:
    return run_local(pipeline, pipeline.arguments([*TINY, *items]), root)


@pytest.fixture(scope="module")
def single_pod_run(raw_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training pipeline with kfp.local, the single-pod branch, registration on (MLflow file store)."""
    root = tmp_path_factory.mktemp("kfp-local")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        mp.setenv("OMP_NUM_THREADS", "1")
        return _local(training.PIPELINE, root / "runs", f"raw_data={raw_data}", "evaluate.register=true")


@pytest.mark.slow
def test_training_pipeline_runs_locally(single_pod_run: Path) -> None:
    steps = sorted(p.name for p in single_pod_run.iterdir())
    assert not [s for s in steps if s.endswith("-pytorchjob")], steps  # the distributed branch was skipped
    (report,) = single_pod_run.glob("nodeseg-evaluate*/report")
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["models"]) == {"unet", "contour", "image"}
    for model in ("unet", "contour", "image"):
        assert 0.0 <= metrics[model]["iou"] <= 1.0
    assert metrics["contour"]["mean_nfe"] > 0 and metrics["unet"]["mean_nfe"] == 0
    registry = json.loads((report / "registry.json").read_text())  # written by the register step
    assert set(registry["versions"]) == {"unet", "contour", "image"} and "reason" in registry
    assert "Contour Evolution" in (report / "table.md").read_text()
    (unet,) = single_pod_run.glob("nodeseg-select*/model/model.pt")
    manifest = json.loads(next(single_pod_run.glob("nodeseg-preprocess/shards/manifest.json")).read_text())
    assert manifest["params"]["size"] == 32  # the tiny params reached the step as --set
    assert unet.is_file()


@pytest.mark.slow
def test_distributed_branch_runs_locally_under_torchrun(raw_data: Path, tmp_path: Path, file_mlflow: None) -> None:
    """distributed=true: the launcher steps' stand-ins run pretrain and refine under torchrun with Master +
    ddp_workers processes (here 2, gloo), as the PyTorchJob would."""
    run = _local(training.PIPELINE, tmp_path / "runs", f"raw_data={raw_data}", "distributed=true",
                 "ddp_workers=1", "evaluate.register=false")
    steps = {p.name for p in run.iterdir()}
    assert {"nodeseg-pretrain-pytorchjob", "nodeseg-refine-pytorchjob"} <= steps
    assert not any(s.startswith("nodeseg-register") for s in steps)
    for step in ("pretrain", "refine"):
        outcome = json.loads((run / f"nodeseg-{step}-pytorchjob" / "outcome").read_text())
        assert outcome["state"] == "Succeeded" and "--nproc-per-node=2" in outcome["message"]
    assert (run / "nodeseg-refine-pytorchjob" / "run" / "model.pt").is_file()
    metrics = json.loads(next(run.glob("nodeseg-evaluate*/report/metrics.json")).read_text())
    assert set(metrics["models"]) == {"unet", "contour", "image"}


@pytest.mark.slow
def test_tuning_pipeline_runs_locally(single_pod_run: Path, tmp_path: Path, file_mlflow: None) -> None:
    """create → two parallel optimize tasks (dsl.ParallelFor) joining one study → report, on the training
    run's shards and selected UNet. The study is an Optuna journal file: with sqlite, two workers starting
    at once can both claim the enqueued reference trial (no row lock), and the second fails with "Cannot
    tell a COMPLETE trial" (reported to the lead)."""
    shards = single_pod_run / "nodeseg-preprocess" / "shards"
    (unet,) = single_pod_run.glob("nodeseg-select*/model")
    run = _local(tuning.PIPELINE, tmp_path / "runs", f"shards_uri={shards}", f"unet_uri={unet}",
                 f"storage=journal:{tmp_path / 'study.log'}", "worker_indices=[0, 1]", "trials_per_task=1",
                 "tune.epochs=1", "tune.max_batches_per_epoch=2")
    assert len(list(run.glob("for-loop-*-iteration-*/nodeseg-tune-optimize"))) == 2
    report = run / "nodeseg-tune-report" / "report"
    choice = json.loads((report / "choice.json").read_text())
    assert choice["solver"] and (report / "trials.csv").read_text().count("\n") >= 3  # header + 2 trials
    solver = yaml.safe_load((run / "nodeseg-tune-report" / "solver_params").read_text())["contour"]["solver"]
    assert solver == choice["solver"]
    load_params([PARAMS, run / "nodeseg-tune-report" / "solver_params"])  # usable as --params
