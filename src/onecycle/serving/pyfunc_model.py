"""The served image classifier as MLflow loads it: a models-from-code file, logged by ``serving.publish``.

MLflow runs this file when it loads the model (``mlflow models serve``, ``mlflow.pyfunc.load_model``);
nothing is unpickled. The network comes from the logged ``model_file`` artifact: ``model.onnx``, run on ONNX
Runtime (the registered model), or a ``model.pt`` read weights-only and run on torch; all the work is
:class:`onecycle.serving.classifier.ImageClassifier`'s, from the package copy logged with the model.
"""

import os
import sys
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

# What MLflow's scoring server (mlflow.pyfunc.scoring_server) sets in its workers' environment: the model it serves.
SERVED_MODEL_PATH = "__pyfunc_model_path__"


class OneCycleImageModel(PythonModel):
    """Base64 image bytes in (column ``image``; param ``k``), per image its top-k classes or an error out."""

    def load_context(self, context):
        from onecycle.serving.classifier import ImageClassifier
        from onecycle.serving.provenance import describe_served

        self.classifier = ImageClassifier(context.artifacts["model_file"])
        if os.environ.get(SERVED_MODEL_PATH):  # a server's worker (mlflow models serve), not a validation at logging
            print(describe_served(context.artifacts["model_file"]), file=sys.stderr, flush=True)  # which model answers

    # The input's type hint is MLflow 3's: a DataFrame (the signature's ``image`` column) is passed on as it is, with
    # no type-hint validation or signature inference (the logged signature says the rest).
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self.classifier(model_input, params)


mlflow.models.set_model(OneCycleImageModel())
