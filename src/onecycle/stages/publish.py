"""publish stage: the evaluated model becomes the registered, servable version, after ``evaluate`` judged it.

Exports ``models/model.pt`` with the test-time augmentation evaluate scored it with (``evaluate.tta``) to ONNX
and checks the export against torch on the test split (:mod:`onecycle.serving.onnx_export`), then logs it as the
image classifier (:mod:`onecycle.serving.publish`, served on ONNX Runtime without torch; on torch, with a warning,
for a network that cannot be exported) into the training's MLflow run (by id: the run's status is left alone), so
the served model answers what the registry's test metrics describe; registers it as
``mlflow.registered_model``, tags the version with evaluate's test results (``reports/metrics.json``, measured on
that very file: ``reports/evaluated_model.json`` records its digest, else nothing is registered), the test
split's digest, the git commit and DVC experiment, and gives it the alias ``@candidate``. Writes
``reports/publish.json`` (the version, its runtime and the export's check). Its own DVC stage: editing the serving code re-runs this stage only,
never ``train``. Running it again for the same model and recipe re-tags the version it registered before
instead of registering another (an interrupted publish completes).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from onecycle.core import measured
from onecycle.core.errors import OneCycleError
from onecycle.core.files import atomic_write_text
from onecycle.core.paths import Workspace
from onecycle.data.store import load_info
from onecycle.stages.command import run_command
from onecycle.tracking import runs, store
from onecycle.tracking.registry import CANDIDATE, RECIPE_TAG, mark_version, tag_recipe, test_digest, versions_serving

log = logging.getLogger(__name__)
SERVED_AS = "onnx"  # part of the recipe: a version served on torch before is not this recipe's


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise OneCycleError(f"{path} is missing or unreadable: run `onecycle {what}` (or `dvc repro`) first") from None


def run(params, ws: Workspace) -> dict:
    """Register the evaluated model; return what reports/publish.json says."""
    from onecycle.serving.publish import log_served_model

    name = params.registered_model  # mlflow.registered_model, auto: onecycle-<dataset>
    tta = params.evaluate.tta
    test = _read_json(ws.metrics_json, "evaluate").get("test") or {}
    run_id = _read_json(ws.runs_json, "train").get("train")
    if not ws.model.is_file():
        raise OneCycleError(f"{ws.model} does not exist: run `onecycle train` (or `dvc repro`) first")
    recipe = hashlib.sha256(ws.model.read_bytes() + f"tta={tta};served={SERVED_AS}".encode()).hexdigest()[:16]
    out = {"registered_model": name or None, "version": None, "model_uri": None, "tta": tta, RECIPE_TAG: recipe}
    if not name or not run_id:
        why = "mlflow.registered_model is not set" if not name else f"{ws.runs_json} names no training run"
        print(f"publish: {why}; nothing registered")
        atomic_write_text(ws.publish_json, json.dumps(out, indent=2) + "\n")
        return out
    measured.check(ws.evaluated_model_json, ws.model, tta, ws.metrics_json)  # its score is this file's, or none
    store.configure(params.mlflow.experiment, ws.root)
    status = runs.run_status(run_id)
    if status is None:
        raise OneCycleError(f"the training's MLflow run {run_id} (named in {ws.runs_json}) is not in the store "
                            f"{store.tracking_uri()}: train again (or point MLFLOW_TRACKING_URI at its store)")
    if status != "FINISHED":  # a diverged (FAILED) or unfinished training is evaluated, never offered for serving
        print(f"publish: the training run {run_id} is {status}; nothing registered")
        atomic_write_text(ws.publish_json, json.dumps(out, indent=2) + "\n")
        return out
    if "top1" not in test:
        raise OneCycleError(f"{ws.metrics_json} has no test top-1: run `onecycle evaluate` (or `dvc repro`) first")
    info = load_info(params.data, ws.root)
    same = versions_serving(name, run_id, recipe)
    if same:  # published before (an interrupted publish, or a rerun): the same version, tagged again
        version = max(same)
        meta = runs.onecycle_metadata(f"models:/{name}/{version}")
        out.update({key: meta[key] for key in ("runtime", "onnx_check") if key in meta})
    else:
        runs.finished_model(run_id, "model")  # drops a classifier an interrupted publish left PENDING
        network = runs.finished_model(run_id, "network")  # train's raw network: its URI goes in the metadata
        log.info("exporting %s to ONNX, checking it against torch on the %s test split, registering it as %s",
                 ws.model, info.name, name)
        logged, served = log_served_model(run_id, ws.model, name, tta, params.data, info, tags={RECIPE_TAG: recipe},
                                          network_uri=f"models:/{network}" if network else None)
        if "error" in served["onnx_check"]:
            print(f"publish: warning: {served['onnx_check']['error']}; the registered model runs on torch")
        version = int(logged.registered_model_version)
        tag_recipe(name, version, recipe)
        out.update(served)
    mark_version(name, version, run_id, test, test_digest(info))
    out.update(version=version, model_uri=f"models:/{name}/{version}")
    atomic_write_text(ws.publish_json, json.dumps(out, indent=2) + "\n")
    check = out.get("onnx_check") or {}
    on = (f"ONNX Runtime, {check['images']} test images checked against torch: top-1 differs on "
          f"{check['top1_differ']}, probabilities within {check['max_abs_diff']:.1g}"
          if out.get("runtime") == "onnxruntime" and "images" in check else out.get("runtime", "torch"))
    print(f"publish: {name} version {version} (test top-1 {test['top1']:.4f}, tta {tta}, on {on}) is @{CANDIDATE}; "
          f"`onecycle promote` makes the best evaluated version @champion")
    return out


def main(argv=None) -> int:
    return run_command("publish", __doc__.splitlines()[0], argv,
                       lambda params, args: run(params, Workspace(Path("."))) and 0)


if __name__ == "__main__":
    raise SystemExit(main())
