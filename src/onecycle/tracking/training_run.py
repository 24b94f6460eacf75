"""The tracked fit that train and tune share: what a training's MLflow run records before the first epoch (params
with the resolved max_lr, datasets, the configuration's hash), each epoch through the fit's hooks, and how a
resumed training finds, continues and completes its run (the run to continue, the metrics a kill lost, the per-step
LR log beside the checkpoints). The stages decide what to train; this module is the one place that logs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onecycle.core.errors import OneCycleError
from onecycle.core.files import atomic_write_text
from onecycle.core.paths import Workspace
from onecycle.core.redact import one_line
from onecycle.data.loaders import SPLIT_SEED
from onecycle.tracking import runs, store
from onecycle.training import checkpoint as ckpt
from onecycle.training.engine import Setup, build_setup, device_name
from onecycle.training.loop import FitHooks, config_hash
from onecycle.training.lr_report import lr_find_run_id
from onecycle.training.optimizers import OPTIMIZERS
from onecycle.training.records import Step, history_csv, row_metrics, schedule_csv
from onecycle.training.schedule import check_fits, lr_and_momentum_at

log = logging.getLogger(__name__)

STEPS_LOG = "schedule_steps.csv"  # every step's LR and momentum, in checkpoints/ beside last.pt (resume)


def prepare(params, root: Path) -> Setup:
    """The model, data and precision of a training of ``params`` (as train, tune and lr_find build them), refusing a
    schedule that does not fit its steps."""
    setup = build_setup(params.data, params.augment, params.model, params.train, root=root)
    check_fits(params.schedule, params.train.epochs, len(setup.train_loader))
    return setup


def run_datasets(params, root: Path) -> dict[str, Any]:
    """The datasets a training of ``params`` reads (train, and val when there is one), as MLflow records them."""
    splits = ["train", "val"] if params.data.val_size != 0 else ["train"]
    return runs.datasets(params.data, root, splits, split_seed=SPLIT_SEED)


def record_config(params, max_lr: float, found: dict[str, Any]) -> None:
    """Log to the active run what identifies a training: every param (``schedule.max_lr`` resolved), the datasets
    ``found`` (:func:`run_datasets`) and the configuration's hash (tag ``config_hash``)."""
    runs.log_params_flat(runs.params_with_max_lr(params.flat(), max_lr))
    runs.log_datasets(found)
    store.mlflow().set_tag("config_hash", config_hash(params.flat(), max_lr))


def epoch_logger(logger: runs.RunLogger, then: Callable[[int, dict, list, list], None] | None = None, *,
                 skip_epochs=(), skip_steps=()) -> Callable[[int, dict, list, list], None]:
    """A fit's ``on_epoch`` hook: log the epoch (:func:`runs.log_epoch`), then call ``then`` (reports, pruning)."""
    def on_epoch(epoch: int, row: dict, steps: list, history: list) -> None:
        runs.log_epoch(logger, row, steps, skip_epochs=skip_epochs, skip_steps=skip_steps)
        if then is not None:
            then(epoch, row, steps, history)

    return on_epoch


def record_training_start(params, setup: Setup, ws: Workspace, max_lr: float, found: dict[str, Any],
                          tags: dict[str, str]) -> None:
    """What a new training run records once: provenance tags, the config (:func:`record_config`), the LR finder's
    run and plot, the model's summary."""
    from onecycle.training.models import model_summary

    mlflow = store.mlflow()
    mlflow.set_tags({**runs.provenance_tags(params.data.dataset, device_name(setup.device), ws.root),
                     "stage": "train", "precision": setup.precision, **tags})
    mlflow.set_tags(runs.lr_report_provenance(ws.lr_find_json, lr_find_run_id(ws.lr_find_json)))
    if ws.lr_find_png.is_file():
        runs.log_artifact(ws.lr_find_png, "lr_find")
    record_config(params, max_lr, found)
    sample = setup.train_loader.dataset[0][0]
    mlflow.log_text(model_summary(setup.net, (1, *sample.shape)), "model_summary.txt")


def _read_steps(path: Path) -> dict[int, Step]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    steps = {}
    for line in lines:
        try:
            s, lr, m = line.split(",")
            steps[int(s)] = Step(int(s), float(lr), float(m))
        except ValueError:  # a line cut short by a kill mid-write
            continue
    return steps


def checkpointing_hooks(ws: Workspace, config_id: str, run_id: str, logger: runs.RunLogger, resumed: bool,
                        identity: dict | None = None) -> FitHooks:
    """Checkpoints into ``ws.checkpoints``; per-epoch and per-step metrics to MLflow; reports/history.csv and
    reports/schedule.csv (every step so far, from ``checkpoints/schedule_steps.csv`` on resume)."""
    def stamp(state: dict) -> dict:
        return {**state, "config_hash": config_id, "mlflow_run_id": run_id,
                **({"identity": identity} if identity is not None else {})}

    logged_epochs = logger.existing_steps("val/top1") | logger.existing_steps("train/loss")
    logged_steps = logger.existing_steps("lr") if resumed else set()
    steps_log = ws.checkpoints / STEPS_LOG
    all_steps = _read_steps(steps_log) if resumed else {}
    if not resumed:
        steps_log.parent.mkdir(parents=True, exist_ok=True)
        steps_log.write_text("")

    def reports(epoch: int, row: dict, steps: list[Step], history: list[dict]) -> None:
        atomic_write_text(ws.history_csv, history_csv(history))
        with steps_log.open("a") as f:
            f.writelines(f"{s.step},{s.lr!r},{s.momentum!r}\n" for s in steps)
        all_steps.update({s.step: s for s in steps})
        atomic_write_text(ws.schedule_csv, schedule_csv([all_steps[s] for s in sorted(all_steps)]))

    return FitHooks(save_last=lambda s: ckpt.save(stamp(s), ws.checkpoints / "last.pt"),
                    save_best=lambda s: ckpt.save(stamp(s), ws.checkpoints / "best.pt"),
                    on_epoch=epoch_logger(logger, reports, skip_epochs=logged_epochs, skip_steps=logged_steps))


def run_finished(experiment: str, root: Path) -> Callable[[str | None], bool]:
    """Whether an MLflow run ended FINISHED (a run the store cannot return counts as finished)."""
    def finished(run_id: str | None) -> bool:
        if not run_id:
            return True
        store.configure(experiment, root)
        try:
            return store.mlflow().MlflowClient().get_run(run_id).info.status == "FINISHED"
        except Exception:
            return True

    return finished


def reusable_run(run_id: str | None, experiment_id: str | None) -> str | None:
    """The checkpoint's MLflow run if it can continue; None (a new run) when it was deleted or is gone.

    A run in another experiment than ``mlflow.experiment`` (changed since) continues in its own experiment.
    """
    if not run_id:
        return None
    mlflow = store.mlflow()
    client = mlflow.MlflowClient()
    try:
        info = client.get_run(run_id).info
    except Exception as exc:
        log.warning("the checkpoint's MLflow run %s is not in the store (%s): the training continues from the "
                    "checkpoint in a new run", run_id, one_line(exc)[:120])
        return None
    if info.lifecycle_stage == "deleted":
        log.warning("the checkpoint's MLflow run %s was deleted: the training continues from the checkpoint in a "
                    "new run (its epochs so far are logged to it)", run_id)
        return None
    if experiment_id is not None and info.experiment_id != experiment_id:
        exp = client.get_experiment(info.experiment_id)
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(info.experiment_id)
        log.warning("mlflow.experiment changed, but the run %s being resumed is in experiment %r: it continues "
                    "there (train.resume: false starts a new run)", run_id, exp.name)
        mlflow.set_experiment(experiment_id=info.experiment_id)
    return run_id


def reconcile_metrics(params, max_lr: float, steps_per_epoch: int, state: dict, logger: runs.RunLogger) -> None:
    """Log what the checkpoint holds but the run lacks (an epoch lost to a kill or MLflow being down at exit).

    Epoch rows come from the checkpoint's history; the per-step LR and momentum of its finished epochs are
    the schedule's (:func:`onecycle.training.schedule.lr_and_momentum_at`); the partial epoch's steps are
    logged when that epoch ends.
    """
    store.mlflow().set_tag("resumed_from_epoch", str(state["epoch"]))
    logged = logger.existing_steps("val/top1") | logger.existing_steps("train/loss")
    missing_rows = [row for row in state.get("history", []) if int(row["epoch"]) not in logged]
    for row in missing_rows:
        logger.log(row_metrics(row), step=int(row["epoch"]))
    done_steps = int(state["epoch"]) * steps_per_epoch
    missing_steps = sorted(set(range(done_steps)) - logger.existing_steps("lr"))
    momentum = OPTIMIZERS.lookup(params.optimizer.name).momentum(params.optimizer)
    for step in missing_steps:
        lr, m = lr_and_momentum_at(params.schedule, max_lr, params.train.epochs, steps_per_epoch, step, momentum)
        logger.log({"lr": lr, "momentum": m}, step=step)
    if missing_rows or missing_steps:
        log.warning("the MLflow run lacked %d epoch(s) and %d step(s) that %s holds: logged them now",
                    len(missing_rows), len(missing_steps), "the checkpoint")
    logger.flush()


def in_dvc_temp_copy(ws: Workspace) -> bool:
    """Whether DVC runs us in a temporary copy it deletes afterwards (``dvc exp run --temp`` / ``--queue``)."""
    here = ws.root.resolve()
    if ".dvc" in here.parts:  # <workspace>/.dvc/tmp/exps/...
        return True
    env = os.environ.get("DVC_ROOT")
    return bool(env) and Path(env).resolve() != here and here == Path.cwd().resolve()


def how_to_resume(ws: Workspace) -> str:
    """What the user runs to continue an interrupted training in ``ws``."""
    if in_dvc_temp_copy(ws):
        return ("this experiment runs in a temporary copy that DVC deletes (`dvc exp run --temp/--queue`), so it "
                "cannot be resumed: run the experiment again to start it over, or use `dvc exp run` in the "
                "workspace to be able to resume")
    return "run `onecycle train` (or `dvc repro`) again to resume"


def log_best(logger: runs.RunLogger, best_top1: float, best_epoch: int, seconds: float) -> None:
    """Send every epoch's metrics (waiting out a server restart), then the run's best epoch and total seconds."""
    if not logger.flush(patient=True):  # MLflow's own retries
        raise OneCycleError("MLflow is not reachable: the epochs' metrics could not be logged")
    store.mlflow().log_metrics({"val_best/top1": max(best_top1, 0.0), "val_best/epoch": best_epoch,
                                "total_seconds": seconds})


def end_finished() -> None:
    """End the active run FINISHED: the last step of a training's finalization."""
    store.mlflow().end_run()


def mark_failed(reason: str) -> None:
    """Tag the active run's ``failure_reason`` and end it FAILED; MLflow trouble here is a warning only."""
    try:
        store.mlflow().set_tag("failure_reason", reason)
    except Exception as exc:
        log.warning("could not tag the MLflow run's failure (%s)", one_line(exc)[:200])
    runs.end_run_quietly("FAILED")
