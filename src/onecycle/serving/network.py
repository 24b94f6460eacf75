"""The trained network as the train stage logs it into its run: ``network``, the raw network in MLflow's "pt2"
format (``torch.export``), softmax output, unregistered, for callers that send normalized CxHxW tensors; and
loading it back (:func:`load_network`) without unpickling anything, whatever the model directory holds.

The registered, servable image classifier is made later, from the evaluated model, by the publish stage
(:mod:`onecycle.serving.publish`), so that editing the serving code re-runs only what publishes.
"""

from __future__ import annotations

import torch

from onecycle.config import AugmentConfig, ModelConfig
from onecycle.serving.modelfile import bundle_metadata, model_bundle
from onecycle.tracking import store


def log_network(setup, state_dict: dict, *, model: ModelConfig, augment: AugmentConfig) -> str:
    """Log the raw network to the active run, unless it holds it already (a finalization run again after a kill);
    returns its model URI."""
    import numpy as np

    from onecycle.tracking.runs import finished_model
    from onecycle.training.models import build_model

    mlflow = store.mlflow()
    logged = finished_model(mlflow.active_run().info.run_id, "network")
    if logged is not None:
        return f"models:/{logged}"
    from mlflow.models import infer_signature

    net = build_model(model, setup.info.num_classes, setup.info.in_channels)
    net.load_state_dict(state_dict)
    served = torch.nn.Sequential(net, torch.nn.Softmax(dim=1)).eval()
    loader = setup.val_loader or setup.train_loader
    # Two examples: with one, torch.export (MLflow's default "pt2" format) would fix the batch size to 1.
    example = torch.stack([loader.dataset[i][0] for i in range(2)]).numpy().astype(np.float32)
    with torch.no_grad():
        probs = served(torch.from_numpy(example)).numpy()
    return mlflow.pytorch.log_model(
        served, name="network", signature=infer_signature(example, probs), input_example=example,
        serialization_format="pt2",
        metadata={"onecycle": bundle_metadata(model_bundle(model, augment, setup.info, {}))},
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
    ).model_uri


def load_network(model_uri: str):
    """The network logged at ``model_uri`` (a pt2 archive: ``torch.export``), its weights on the device it was saved
    from. Nothing is unpickled: a directory that holds anything else (a pickled model, a model.pth, records that
    are not plain tensors) is refused in one line (OneCycleError), never handed to ``mlflow.pytorch.load_model``."""
    import tempfile
    from pathlib import Path

    from onecycle.core.errors import OneCycleError

    mlflow = store.mlflow()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)).resolve()
        flavor = (mlflow.models.Model.load(str(local / "MLmodel")).flavors or {}).get("pytorch") or {}
        data = (local / str(flavor.get("model_data", ""))).resolve()
        archive = data / "model.pt2"
        if (not flavor.get("model_data") or local not in data.parents or not archive.is_file()
                or (data / "model.pth").exists()):
            raise OneCycleError(f"{model_uri} holds no torch.export network (a pytorch flavor with data/model.pt2 and no "
                                "pickled model.pth): onecycle loads only weights-only model files and pt2 networks")
        try:
            from mlflow.pytorch import _validate_pt2_archive_is_pickle_free as pickle_free  # checks every record

            pickle_free(str(archive))  # whatever MLFLOW_ALLOW_PICKLE_DESERIALIZATION says
        except Exception as exc:
            raise OneCycleError(f"{model_uri}: refused, its pt2 archive holds more than plain tensors and metadata "
                                f"({' '.join(str(exc).split())[:160]})") from None
        return torch.export.load(str(archive)).module()
