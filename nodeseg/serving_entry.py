"""MLflow "models from code" entry point: MLflow runs this file to build the pyfunc model (no pickling)."""

import mlflow.models

from nodeseg.serving import NodesegModel

mlflow.models.set_model(NodesegModel())
