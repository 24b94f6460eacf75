"""The LR finder's own MLflow run: opened in the training's experiment with the provenance tags every run carries
and the params the range test read, then the sweep's curves (``lr_find/lr``, ``lr_find/loss``,
``lr_find/smoothed_loss``, one point per step), every suggestion (``lr_find/suggested_<name>``) and the report files.
A training run names this run in its ``lr_find_run_id`` tag.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onecycle.tracking import runs, store

RUN_NAME = "lr_find"


@contextmanager
def lr_find_run(experiment: str, root: Path, dataset: str, device: str, precision: str,
                flat_params: dict[str, Any]) -> Iterator[str]:
    """Open the LR finder's run (tagged, with ``flat_params`` logged) and yield its id; an error inside ends it FAILED."""
    mlflow = store.mlflow()
    store.configure(experiment, root)
    with mlflow.start_run(run_name=RUN_NAME) as active:
        mlflow.set_tags({**runs.provenance_tags(dataset, device, root), "stage": "lr_find", "precision": precision})
        runs.log_params_flat(flat_params)
        yield active.info.run_id


def log_range_test(run_id: str, result, files: Sequence[Path]) -> None:
    """Log a range test's result (a :class:`~onecycle.training.rangetest.RangeTestResult`) and ``files`` to the
    open LR finder run ``run_id``."""
    logger = runs.RunLogger(run_id)
    logger.log_series({"lr_find/lr": result.lrs, "lr_find/loss": result.losses,
                       "lr_find/smoothed_loss": result.smoothed})
    logger.log({f"lr_find/suggested_{name}": lr for name, lr in result.suggestions.items() if lr is not None}, 0)
    logger.flush()
    for path in files:
        runs.log_artifact(path)
