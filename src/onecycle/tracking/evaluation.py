"""The evaluate stage's side of the training's MLflow run: the check that the run is still in the store before any
work, and what an evaluation adds to it: the test dataset, the ``test_*`` metrics linked to the run's logged model
and that dataset, the worst class as a tag, the per-class results as one MLflow table and the report files.

Everything is logged by run id (MlflowClient), never by re-opening the run with ``mlflow.start_run(run_id=...)``,
which sets it RUNNING and ends it FINISHED/FAILED/KILLED: an evaluate interrupted here must not change how the
training ended. Everything is safe to log again, so running evaluate again completes an interrupted one.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from onecycle.core.errors import OneCycleError
from onecycle.tracking import runs, store

log = logging.getLogger(__name__)

PER_CLASS_TABLE = "evaluate/per_class.json"  # the per-class results, as an MLflow table of the training's run
ARTIFACT_FOLDER = "evaluate"  # where the report files go in the training's run


def require_training_run(run_id: str, named_in: Path, experiment: str, root: Path) -> None:
    """Configure the store; a training run ``run_id`` (named in ``named_in``) it lacks or deleted is one line."""
    store.configure(experiment, root)
    mlflow = store.mlflow()
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        raise OneCycleError(f"the training's MLflow run {run_id} (named in {named_in}) "
                            f"{'was deleted' if run else 'is not'} in the store {store.tracking_uri()}: restore it "
                            f"in the MLflow UI (or `mlflow runs restore --run-id {run_id}`), or train again")


def log_evaluation(run_id: str, data_cfg, root: Path, metrics: dict, table: list[dict], files: Sequence[Path]) -> None:
    """Add the test metrics (``metrics``: metrics.json's), the per-class ``table`` and ``files`` to the training's
    run ``run_id`` (``onecycle publish`` then registers the evaluated model and marks it @candidate)."""
    mlflow = store.mlflow()
    client = mlflow.MlflowClient()
    status = client.get_run(run_id).info.status
    test_set = runs.datasets(data_cfg, root, ["test"])
    runs.log_datasets(test_set, run_id=run_id)
    # linked to the logged model and the test dataset (the model's page and the metric's dataset column);
    # unprefixed like mlflow.evaluate's, so the run page shows them after the learning curves (loop.METRIC_KEYS)
    mlflow.log_metrics({f"test_{k}": v for k, v in metrics["test"].items() if k != "n" and isinstance(v, int | float)},
                       run_id=run_id, model_id=runs.model_of_run(run_id), dataset=test_set["test"])
    client.set_tag(run_id, "test/worst_class", metrics["test"]["worst_class"])
    _log_per_class_table(run_id, table)
    for path in files:
        runs.log_artifact(path, ARTIFACT_FOLDER, run_id=run_id)
    if status != "FINISHED":  # a FAILED (diverged) or KILLED training stays so: evaluating it finishes nothing
        log.info("the training run %s ended %s; its evaluation is logged, and it is not published", run_id, status)


def _log_per_class_table(run_id: str, table: list[dict]) -> None:
    """The per-class results as one MLflow table (not a metric per class: ImageNet would make 1,000 charts)."""
    client = store.mlflow().MlflowClient()
    columns = {key: [r[key] for r in table] for key in table[0]}
    if PER_CLASS_TABLE not in {f.path for f in client.list_artifacts(run_id, ARTIFACT_FOLDER)}:
        client.log_table(run_id, data=columns, artifact_file=PER_CLASS_TABLE)
        return
    # evaluated again: log_table would append the rows to the old table, so replace the file (same format)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(PER_CLASS_TABLE).name
        path.write_text(json.dumps({"columns": list(columns), "data": [list(r.values()) for r in table]}))
        runs.log_artifact(path, str(Path(PER_CLASS_TABLE).parent), run_id=run_id)
