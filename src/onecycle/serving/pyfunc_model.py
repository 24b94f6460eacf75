"""The served image classifier as MLflow loads it: a models-from-code file, logged by ``serving.publish``.

MLflow runs this file when it loads the model (``mlflow models serve``, ``mlflow.pyfunc.load_model``);
nothing is unpickled. The network comes from the logged ``model_file`` artifact: ``model.onnx``, run on ONNX
Runtime (the registered model), or a ``model.pt`` read weights-only and run on torch; all the work is
:class:`onecycle.serving.classifier.ImageClassifier`'s, from the package copy logged with the model.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class OneCycleImageModel(PythonModel):
    """Base64 image bytes in (column ``image``; param ``k``), per image its top-k classes or an error out."""

    def load_context(self, context):
        from onecycle.serving.classifier import ImageClassifier

        self.classifier = ImageClassifier(context.artifacts["model_file"])

    def predict(self, context, model_input, params=None):
        return self.classifier(model_input, params)


mlflow.models.set_model(OneCycleImageModel())
