"""The trained model as MLflow logs, registers and serves it.

``log_final_model`` logs the best weights with ``mlflow.pytorch.log_model`` in MLflow's "pt2" format
(``torch.export``: loading it runs no pickled code), softmax output, a signature and an input example,
registered under ``mlflow.registered_model``, with the metadata ``onecycle predict --model-uri`` needs.
"""

from __future__ import annotations

import torch

from . import tracking
from .modelfile import model_bundle


def log_final_model(params, setup, state_dict: dict) -> str | None:
    """Log the best model to the active run and register it; returns its model URI."""
    import numpy as np

    from .models import build_model

    mlflow = tracking.mlflow()
    from mlflow.models import infer_signature

    model = build_model(params.model, setup.info.num_classes, setup.info.in_channels)
    model.load_state_dict(state_dict)
    served = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    loader = setup.val_loader or setup.train_loader
    # Two examples: with one, torch.export (MLflow's default "pt2" format) would fix the batch size to 1.
    example = torch.stack([loader.dataset[i][0] for i in range(2)]).numpy().astype(np.float32)
    with torch.no_grad():
        probs = served(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, probs)
    info = mlflow.pytorch.log_model(
        served, name="model", signature=signature, input_example=example,
        registered_model_name=params.mlflow.registered_model, serialization_format="pt2",
        # what `onecycle predict --model-uri` needs to preprocess images and name classes
        metadata={"onecycle": {k: v for k, v in model_bundle(params, setup.info, {}).items() if k != "state_dict"}},
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
    )
    return info.model_uri
