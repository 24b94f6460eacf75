"""What an Optuna study records in MLflow: one parent run per study (its id kept in the study), a nested run per
trial (tags, the trial's values and costs, its state at the end), the study's summary on the parent (a
multi-objective study's Pareto front as a table and a plot), and the ends of runs whose worker died. MLflow trouble
here never ends a study: :func:`quietly` turns it into a warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from onecycle.tracking import runs
from onecycle.tracking.store import mlflow

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # the study user attr that names its MLflow parent run


def quietly(what: str, fn: Callable[[], Any]) -> None:
    """Run an MLflow call whose failure must not end a study (the store may be locked by another worker)."""
    try:
        fn()
    except Exception as exc:
        log.warning("MLflow: could not %s (%s)", what, " ".join(str(exc).split())[:160])


def parent_run(study, created: bool, experiment_id: str, tags: dict[str, str],
               wait_s: float = 30.0) -> tuple[str, bool]:
    """``(run_id, new)``: the study's MLflow parent run, created and recorded in the study if it has none.

    A worker that joins a study another worker has just created waits (up to ``wait_s``) for that worker
    to record its parent run, so that both log under one parent.
    """
    client = mlflow().MlflowClient()
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    deadline = time.monotonic() + (0 if created else wait_s)
    while run_id is None and time.monotonic() < deadline:
        time.sleep(0.5)
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id is not None:
        try:
            info = client.get_run(run_id).info
            if info.lifecycle_stage == "active" and info.experiment_id == experiment_id:
                return run_id, False
        except Exception:  # not in this tracking store (MLFLOW_TRACKING_URI changed)
            pass
        log.warning("the study's MLflow parent run %s is not in this tracking store and experiment (or was "
                    "deleted); starting a new one", run_id)
    run = client.create_run(experiment_id, run_name=f"tune:{study.study_name}", tags=tags)
    study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
    return run.info.run_id, True


def continue_run(run_id: str):
    """A context manager: ``run_id`` (the study's parent) as the active run."""
    return mlflow().start_run(run_id=run_id)


def end_killed(run_id: str | None) -> None:
    """Mark a dead worker's trial run KILLED (quietly)."""
    if run_id:
        quietly("end its run", lambda: mlflow().MlflowClient().set_terminated(run_id, "KILLED"))


def start_trial_run(number: int, tags: dict[str, str]) -> str:
    """Start trial ``number``'s nested run under the active parent, tagged; returns its id."""
    run_id = mlflow().start_run(nested=True, run_name=f"trial-{number}").info.run_id
    mlflow().set_tags({**tags, "stage": "tune_trial", "trial_number": str(number), "state": "RUNNING"})
    return run_id


def set_tag(key: str, value: str) -> None:
    """Tag the active run."""
    mlflow().set_tag(key, value)


def log_value(name: str, value: float, step: int | None = None) -> None:
    """Log one metric to the active run."""
    mlflow().log_metric(name, value, step=step)


def log_values(metrics: dict[str, float], step: int | None = None) -> None:
    """Log metrics to the active run."""
    mlflow().log_metrics(metrics, step=step)


def end_trial_run(state: str, status: str) -> None:
    """Tag the trial run's Optuna ``state`` (quietly) and end it with MLflow ``status``."""
    quietly("tag the trial's state", lambda: mlflow().set_tag("state", state))
    runs.end_run_quietly(status)


def log_study_params(flat: dict[str, Any]) -> None:
    """The study's params, on its new parent run (quietly)."""
    quietly("log the study's params", lambda: runs.log_params_flat(flat))


def log_study_summary(best, values: dict[str, Any], n_trials: int, ratios: dict[str, float], files: list) -> None:
    """The best trial (a multi-objective study: the front's best score) on the parent run: its first value (at step
    = trials so far; its cost as ``best/cost``), tags, best.json and the reports."""
    def log_summary() -> None:
        client = mlflow()
        client.log_metric("best/value", best.values[0], step=n_trials)
        if len(best.values) > 1:
            client.log_metric("best/cost", best.values[1], step=n_trials)
        client.set_tags({"best_trial": str(best.number), "best_value": f"{best.values[0]:.6g}",
                         "best_mlflow_run_id": best.user_attrs.get("mlflow_run_id", ""),
                         **{f"best.{k}": str(v) for k, v in values.items()}})
        if ratios:
            client.log_metrics({f"best/max_lr_over_{name}": r for name, r in ratios.items()})
        client.log_dict({"trial": best.number, "value": best.values[0], "values": best.values, "params": values},
                        "tune/best.json")
        for path in files:
            runs.log_artifact(path, "tune")

    quietly("log the study's summary", log_summary)


FRONT_TABLE = "tune/pareto_front.json"  # the parent run's table artifact: the study's Pareto front


def log_front(columns: list[str], rows: list[list[Any]], n_trials: int) -> None:
    """A multi-objective study's Pareto front on the parent run: the table :data:`FRONT_TABLE` (MLflow's table
    format, as ``mlflow.log_table`` writes it, replaced at each report rather than appended to), its size as the
    metric ``pareto_front_size`` (at step = trials so far)."""
    def log() -> None:
        import json
        import tempfile
        from pathlib import Path

        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        client, run_id = mlflow().MlflowClient(), mlflow().active_run().info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(FRONT_TABLE).name
            path.write_text(json.dumps({"columns": columns, "data": rows}))
            client.log_artifact(run_id, str(path), str(Path(FRONT_TABLE).parent))
        logged = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": FRONT_TABLE, "type": "table"}
        if entry not in logged:  # the run page lists it as a table
            client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))
        mlflow().log_metric("pareto_front_size", len(rows), step=n_trials)

    quietly("log the study's Pareto front", log)
