"""The ``nodeseg <stage>`` steps: what each takes and makes, as plain data (:data:`STAGES`).

A stage's artifacts are ports (``--shards``, ``--out``, ...); its hyperparameters are the keys of the params
sections it reads (:func:`components.params.stage_params`), passed as ``--set key=value``. The stage gets
no base params file (``--params /dev/null``): every key it reads arrives with ``--set``, and the image
holds no params.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kfp import dsl

from components.params import PipelineParam, stage_params
from nodeseg.tuning import DEFAULT_STUDY

NO_BASE_PARAMS = "/dev/null"


@dataclass(frozen=True)
class Port:
    """An artifact a step reads (input) or writes (output); ``flag`` None: not on the command line."""

    name: str
    artifact: type[dsl.Artifact]
    output: bool = False
    flag: str | None = None
    suffix: str = ""  # appended to the artifact path: a file inside an artifact folder


@dataclass(frozen=True)
class Option:
    """A command-line option that is not a params.yaml key (``--batch-size`` of predict, ...)."""

    name: str
    type: type
    default: Any
    flag: str


@dataclass(frozen=True)
class StageSpec:
    """One ``nodeseg <stage>`` step."""

    stage: str  # the step's name (tune-create); the CLI stage is ``cli`` when set (tune)
    description: str
    ports: tuple[Port, ...]
    options: tuple[Option, ...] = ()
    flags: tuple[str, ...] = ()  # fixed arguments (--phase create)
    cli: str = ""
    fixed: tuple[tuple[str, str], ...] = ()  # --set key=value always passed; those keys are no inputs
    params_file: str | None = NO_BASE_PARAMS  # None: the stage takes no --params/--set (predict)
    gpu: bool = False  # trains: asks for GPUs on the cluster
    ddp: bool = False  # can run as a PyTorchJob through the launcher
    database: bool = False  # opens the Optuna study storage: gets the database password as PGPASSWORD

    @property
    def command(self) -> str:
        """The ``nodeseg`` stage this step runs."""
        return self.cli or self.stage

    @property
    def function_name(self) -> str:  # kfp names the component after it: nodeseg-tune-create
        return "nodeseg_" + self.stage.replace("-", "_")

    @property
    def params(self) -> tuple[PipelineParam, ...]:
        if self.params_file is None:
            return ()
        return stage_params(self.command, exclude=[k for k, _ in self.fixed])

    def plain(self) -> dict[str, Any]:
        """The command-line layout as plain data (what :func:`components._runtime.stage_argv` reads)."""
        return {
            "stage": self.command,
            "ports": [(p.name, p.flag, p.suffix) for p in self.ports],
            "flags": list(self.flags),
            "options": [(o.name, o.flag) for o in self.options],
            "params_file": self.params_file,
            "params": [(p.key, p.name) for p in self.params],
            "fixed": [list(kv) for kv in self.fixed],
        }


MODEL_FILE = "/model.pt"  # select, refine and image-evolve export <out>/model.pt


def _in(name: str, artifact: type[dsl.Artifact], flag: str | None, suffix: str = "") -> Port:
    return Port(name, artifact, output=False, flag=flag, suffix=suffix)


def _out(name: str, artifact: type[dsl.Artifact], flag: str) -> Port:
    return Port(name, artifact, output=True, flag=flag)


_SHARDS = _in("shards", dsl.Dataset, "--shards")
_MODELS = (
    _in("unet", dsl.Model, "--unet", MODEL_FILE),
    _in("contour", dsl.Model, "--contour", MODEL_FILE),
    _in("image", dsl.Model, "--image", MODEL_FILE),
)

#: where the study lives; the default is the PostgreSQL of k8s/base, the password comes as PGPASSWORD
DEFAULT_STORAGE = "postgresql+psycopg2://optuna@postgres:5432/optuna"
_STUDY = (Option("storage", str, DEFAULT_STORAGE, "--storage"),
          Option("study_name", str, DEFAULT_STUDY, "--study-name"))

STAGES: dict[str, StageSpec] = {
    s.stage: s
    for s in (
        StageSpec("generate", "Phantom CT cases in the KiTS19 layout.", (_out("raw", dsl.Dataset, "--out"),)),
        StageSpec("preprocess", "Raw cases or a saliency folder to parquet shards.",
                  (_in("raw", dsl.Dataset, "--raw"), _out("shards", dsl.Dataset, "--out"))),
        StageSpec("pretrain", "Train the UNet to regress the signed distance map.",
                  (_SHARDS, _out("run", dsl.Model, "--out")), gpu=True, ddp=True),
        StageSpec("select", "Keep the UNet checkpoint with the lowest loss on the first validation samples.",
                  (_in("run", dsl.Model, "--run"), _out("model", dsl.Model, "--out"))),
        StageSpec("refine", "Train Contour Evolution on the frozen, selected UNet.",
                  (_SHARDS, _MODELS[0], _out("run", dsl.Model, "--out")), gpu=True, ddp=True),
        StageSpec("image-evolve", "Train Image Evolution.", (_SHARDS, _out("run", dsl.Model, "--out")), gpu=True),
        StageSpec("evaluate", "IoU, adaptive and weighted F-beta, NFE, figures (registration is its own step).",
                  (_SHARDS, *_MODELS, _out("report", dsl.Artifact, "--out")),
                  fixed=(("evaluate.register", "false"),)),
        # the models are inputs without a flag: metrics.json names their files, which must exist here too
        StageSpec("register", "Register the evaluated models in MLflow and decide the champion alias.",
                  (_in("report", dsl.Artifact, "--eval"), *(Port(p.name, p.artifact) for p in _MODELS))),
        StageSpec("predict", "Segment a NIfTI volume or an image folder with a model.",
                  (_in("model", dsl.Model, "--model", MODEL_FILE), _in("images", dsl.Artifact, "--input"),
                   _out("masks", dsl.Artifact, "--output")),
                  options=(Option("batch_size", int, 8, "--batch-size"),), params_file=None),
        # the tolerance study in three steps: create it, join it from parallel tasks, report on it
        StageSpec("tune-create", "Create the Optuna study (objectives, reference trial, MLflow parent run).",
                  (_out("study", dsl.Artifact, "--out"),), options=_STUDY, flags=("--phase", "create"),
                  cli="tune", database=True),
        StageSpec("tune-optimize", "Join the study and run trials (short refinements) in one process.",
                  (_SHARDS, _MODELS[0], _out("trials", dsl.Artifact, "--out")),
                  options=(*_STUDY, Option("worker_index", int, 0, "--worker-index"),
                           Option("trials_per_task", int, 1, "--n-trials")),
                  flags=("--phase", "optimize", "--workers", "1"), cli="tune", database=True, gpu=True),
        StageSpec("tune-report", "The Pareto front, the chosen operating point and its solver params.",
                  (_out("report", dsl.Artifact, "--out"), _out("solver_params", dsl.Artifact, "--write-params")),
                  options=_STUDY, flags=("--phase", "report"), cli="tune", database=True),
    )
}


@dataclass(frozen=True)
class LauncherOption:
    """An input of the launcher step (a pipeline parameter of the same name)."""

    name: str
    type: type
    default: Any
    help: str = ""


LAUNCHER_OPTIONS: tuple[LauncherOption, ...] = (
    LauncherOption("namespace", str, "nodeseg", "namespace of the PyTorchJob (where k8s/ is deployed)"),
    LauncherOption("ddp_workers", int, 1, "Worker replicas besides the Master"),
    LauncherOption("job_delete", str, "on-success", "delete the PyTorchJob: always, on-success or never"),
    LauncherOption("job_timeout_s", float, 86400.0, "give up on the PyTorchJob after this many seconds"),
)
LAUNCH_COMMAND = ["python", "-m", "nodeseg.kube.pytorchjob", "launch"]
OUTCOME = "outcome"  # the launcher's output parameter: the job's outcome as JSON


@dataclass(frozen=True)
class Interface:
    """A component's inputs and outputs in signature order: (name, annotation, annotation source, default)."""

    entries: tuple[tuple[str, Any, str, Any], ...]

    @property
    def names(self) -> list[str]:
        return [e[0] for e in self.entries]


NO_DEFAULT = object()  # an entry without a default (artifacts)


def interface(spec: StageSpec, *, launcher: bool = False) -> Interface:
    """The inputs and outputs of ``spec``'s component (the launcher adds its options and the outcome)."""
    entries: list[tuple[str, Any, str, Any]] = []
    for p in spec.ports:
        wrap, text = (dsl.Output, "Output") if p.output else (dsl.Input, "Input")
        entries.append((p.name, wrap[p.artifact], f"{text}[{p.artifact.__name__}]", NO_DEFAULT))
    if launcher:
        entries.append((OUTCOME, dsl.OutputPath(str), "OutputPath(str)", NO_DEFAULT))
        entries += [(o.name, o.type, o.type.__name__, o.default) for o in LAUNCHER_OPTIONS]
    entries += [(o.name, o.type, o.type.__name__, o.default) for o in spec.options]
    entries += [(p.name, p.type, p.type.__name__, p.default) for p in spec.params]
    return Interface(tuple(entries))
