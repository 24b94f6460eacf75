"""What every MLflow run carries and how it is logged: run names, provenance tags, params, datasets, a run's
logged models (:func:`run_models`, the one look-up), checkpoints as MLflow 3 logged models
(:func:`log_checkpoint_model`), ending a run when something failed (:func:`end_run_quietly`), and metrics, buffered
(:class:`RunLogger`) and sent in batches; if the store is locked or unreachable they are kept and retried at the
next flush. :func:`log_epoch` is the one way an epoch is logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from onecycle.tracking.store import brief_http_retries, mlflow
from onecycle.training.records import Step, row_metrics

log = logging.getLogger(__name__)

SYSTEM_METRICS_INTERVAL = 2.0  # seconds between system-metric samples (MLflow's 10 s misses short runs)
# MLflow's context names for a run's datasets (the mlflow.data.context input tag), per split
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}
CHECKPOINT_MODEL_TYPE = "checkpoint"  # the model_type of a checkpoint's logged model (not a servable model)


def run_name(default: str) -> str:
    """A new run's name: the DVC experiment's (``dvc exp run -n NAME``) when DVC runs us, else ``default``."""
    return os.environ.get("DVC_EXP_NAME") or default


def start_run(run_id: str | None, name: str | None, system_metrics: bool):
    """``mlflow.start_run``, with MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py)."""
    mlf = mlflow()
    if system_metrics:
        mlf.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL)  # MLFLOW_SYSTEM_METRICS_* env vars win
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter
    return mlf.start_run(run_id=run_id, run_name=name, log_system_metrics=system_metrics)


def split_digest(files: dict[str, str], split: str, val_size: int | None = None, train_subset: int | None = None,
                 split_seed: int | None = None) -> str:
    """A digest of one split: fetch's file checksums plus what picks the split's examples out of them.

    Machine-independent: the same fetched files and split settings give the same digest anywhere.
    """
    spec: dict[str, Any] = {"files": dict(sorted(files.items())), "split": split}
    if split != "test":
        spec.update(val_size=val_size, train_subset=train_subset, split_seed=split_seed)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def datasets(data_cfg, root: Path, splits: list[str], split_seed: int | None = None) -> dict[str, Any]:
    """MLflow datasets (``mlflow.data``) of the fetched ``splits``: name, digest, source = the DVC-tracked folder."""
    mlflow()
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    from onecycle.data.store import dataset_dir, workspace_relative

    folder = dataset_dir(data_cfg, root)
    files = json.loads((folder / "meta.json").read_text()).get("files") or {}
    return {split: MetaDataset(LocalArtifactDatasetSource(workspace_relative(folder, root)), name=f"{data_cfg.dataset}-{split}",
                               digest=split_digest(files, split, data_cfg.val_size, data_cfg.train_subset,
                                                   split_seed))
            for split in splits}


def log_datasets(found: dict[str, Any], run_id: str | None = None) -> None:
    """Log datasets (split -> mlflow dataset) as a run's inputs, with MLflow's context names; to the active run
    unless ``run_id`` names one (logged by id: the run's status is left alone)."""
    mlf = mlflow()
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, DATASET_CONTEXTS[split])])
              for split, dataset in found.items()]
    mlf.MlflowClient().log_inputs(run_id or mlf.active_run().info.run_id, datasets=inputs)


def log_artifact(local_path: str | Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
    """Log a file as an artifact of the active run, or of ``run_id`` by id (its status left alone).

    A copy refused for space (a full disk, ``ulimit -f``) names its target in the artifact store, which the
    copy's own error does not always do.
    """
    from onecycle.core.errors import NO_SPACE_ERRNOS

    mlf = mlflow()
    try:
        if run_id:
            mlf.MlflowClient().log_artifact(run_id, str(local_path), artifact_path)
        else:
            mlf.log_artifact(str(local_path), artifact_path)
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS and not exc.filename2:
            base = mlf.MlflowClient().get_run(run_id).info.artifact_uri if run_id else mlf.get_artifact_uri()
            _name_target(exc, local_path, base, artifact_path)
        raise


def _name_target(exc: OSError, local_path: str | Path, base: str, artifact_path: str | None = None) -> None:
    """Name a refused copy's source and its target in the artifact store (``base``: a run's or model's URI)."""
    exc.filename = str(local_path)
    exc.filename2 = "/".join([base.removeprefix("file://"), *([artifact_path] if artifact_path else []),
                              Path(local_path).name])


def run_exists(run_id: str | None) -> bool:
    """Whether ``run_id`` is a (not deleted) run of the current store."""
    if not run_id:
        return False
    try:
        return mlflow().MlflowClient().get_run(run_id).info.lifecycle_stage != "deleted"
    except Exception:  # MLflow raises RESOURCE_DOES_NOT_EXIST (another store's run, a committed report)
        return False


def run_status(run_id: str) -> str | None:
    """The status of ``run_id`` in the current store (``FINISHED``, ``FAILED``...), or None if it cannot be read."""
    try:
        return mlflow().MlflowClient().get_run(run_id).info.status
    except Exception:  # not in this store (another store's run), or the store refused to answer
        return None


def lr_report_provenance(report: Path, run_id: str | None) -> dict[str, str]:
    """Where a training's LR report came from, as tags that resolve: its LR finder run when that run is in this
    store; otherwise the git commit the report was committed in (as when a fresh clone reuses the repo's)."""
    if run_exists(run_id):
        return {"lr_find_run_id": run_id}
    if not Path(report).is_file():
        return {}
    commit = file_commit(report)
    return {"lr_find_report": f"{Path(report).name} from git commit {commit}" if commit else
            f"{Path(report).name}, not committed, from an LR finder run that is not in this store"}


def run_models(run_id: str, name: str | None = None, model_type: str | None = None) -> list:
    """The logged models ``run_id`` logged (their ``source_run_id``), newest first, whatever their status (an upload
    cut by a kill leaves one PENDING); only those named ``name`` and of ``model_type`` when given. Every look-up of a
    run's models goes through here."""
    mlf = mlflow()
    experiment = mlf.MlflowClient().get_run(run_id).info.experiment_id
    conditions = [f"source_run_id = '{run_id}'", *(f"{key} = '{value}'" for key, value in
                                                   (("name", name), ("model_type", model_type)) if value)]
    return mlf.search_logged_models(experiment_ids=[experiment], filter_string=" AND ".join(conditions),
                                    output_format="list")


def finished_model(run_id: str, name: str) -> str | None:
    """The id of the READY model named ``name`` that ``run_id`` logged, if any; one left PENDING or FAILED by an
    interrupted log (``kill -9`` while uploading) is deleted, so that logging again leaves the run one model."""
    from mlflow.entities import LoggedModelStatus

    client = mlflow().MlflowClient()
    ready = None
    for model in run_models(run_id, name):
        if model.status == LoggedModelStatus.READY and ready is None:
            ready = model.model_id
        elif model.status != LoggedModelStatus.READY:
            client.delete_logged_model(model.model_id)
    return ready


def model_of_run(run_id: str, name: str = "model") -> str | None:
    """The id of the READY model named ``name`` that a run logged (the registered image classifier by default; if
    none has that name, the newest READY one it logged that is not a checkpoint), or None."""
    from mlflow.entities import LoggedModelStatus

    ready = [m for m in run_models(run_id) if m.status == LoggedModelStatus.READY]
    found = [m for m in ready if m.name == name] or [m for m in ready if m.model_type != CHECKPOINT_MODEL_TYPE]
    return found[0].model_id if found else None


def end_run_quietly(status: str) -> None:
    """End the active MLflow run with ``status``; MLflow trouble here is logged, never raised, so that it cannot
    replace the error being reported."""
    from onecycle.core.redact import one_line

    try:
        mlflow().end_run(status=status)
    except Exception as exc:
        log.warning("could not mark the MLflow run %s (%s)", status, one_line(exc)[:200])


def log_checkpoint_model(path: Path, run_id: str, name: str, step: int, metrics: dict[str, float],
                         logger: RunLogger, tags: dict[str, str] | None = None) -> str:
    """Log a checkpoint file as an MLflow 3 logged model of the run (``model_type`` "checkpoint", the file as its
    artifact), an output of the run at ``step`` (its epoch), with ``metrics`` (that epoch's) linked to it and,
    through ``logger``, to their datasets; return its model id.

    Safe to run again: a READY checkpoint model of this run and name is kept; a PENDING one (an interrupted
    upload) is completed. The model's tag ``epoch`` repeats ``step`` (searchable: ``tags.epoch``). The metrics reuse the run's own points at ``step`` (their timestamps), so the run's
    history gains no duplicate.
    """
    from onecycle.core.errors import NO_SPACE_ERRNOS, OneCycleError

    mlf = mlflow()
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    client = mlf.MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    found = run_models(run_id, name, CHECKPOINT_MODEL_TYPE)
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    if ready:
        return ready[0].model_id
    pending = [m for m in found if m.status == LoggedModelStatus.PENDING]
    model = pending[0] if pending else client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, model_type=CHECKPOINT_MODEL_TYPE,
        tags={**(tags or {}), "epoch": str(step)})
    try:
        client.log_model_artifact(model.model_id, str(path))
    except OSError as exc:  # a full disk: the message names the file in the model's artifacts
        if exc.errno in NO_SPACE_ERRNOS and not exc.filename2:
            _name_target(exc, path, model.artifact_location)
        raise
    timestamps = {}
    for key in metrics:
        points = [m for m in client.get_metric_history(run_id, key) if m.step == step]
        if points:
            timestamps[key] = points[-1].timestamp
    logger.log(metrics, step=step, model_id=model.model_id, timestamps=timestamps)
    if not logger.flush(patient=True):
        raise OneCycleError(f"MLflow is not reachable: the metrics of the checkpoint model {name} were not logged")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def _git(root: Path, *args: str) -> str:
    """git's output (right-stripped: ``status --porcelain`` lines begin with a meaningful space), "" on failure."""
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.rstrip()
    except (OSError, subprocess.SubprocessError):
        return ""


def pipeline_outputs(root: Path) -> set[Path]:
    """What ``dvc repro`` itself rewrites in a checkout: dvc.lock and every stage's outputs (absolute paths)."""
    from onecycle.core.paths import STAGE_OUTPUTS, Workspace

    ws = Workspace(root)
    return {(root / "dvc.lock").resolve(), *(Path(getattr(ws, attr)).resolve()
                                            for attrs in STAGE_OUTPUTS.values() for attr in attrs)}


def git_info(root: Path | None = None) -> dict[str, str]:
    """``git_commit`` and ``git_dirty``: whether tracked files differ from the commit, not counting what the pipeline
    writes (dvc.lock, the stages' outputs), so a plain ``dvc repro`` in a clean clone is not dirty."""
    root = (root or Path.cwd()).resolve()
    commit = _git(root, "rev-parse", "HEAD")
    top = _git(root, "rev-parse", "--show-toplevel")
    ignored = pipeline_outputs(root)
    changed = [Path(top, line[3:].split(" -> ")[-1].strip('"')).resolve()
               for line in _git(root, "status", "--porcelain", "--untracked-files=no").splitlines() if len(line) > 3]
    dirty = [p for p in changed if not any(p == o or o in p.parents for o in ignored)]
    return {"git_commit": commit or "unknown", "git_dirty": str(bool(dirty)).lower()}


def file_commit(path: Path) -> str | None:
    """The git commit that last changed ``path``, if the file is committed as it is now; None otherwise."""
    path = Path(path).resolve()
    root = path.parent
    if not path.is_file() or _git(root, "status", "--porcelain", "--", path.name):
        return None
    return _git(root, "log", "-1", "--format=%H", "--", path.name) or None


def provenance_tags(dataset: str, device_name: str, root: Path | None = None) -> dict[str, str]:
    """Tags every run carries: git commit and dirty flag, DVC experiment, device, torch, dataset."""
    import torch

    tags = {**git_info(root), "device": device_name, "torch_version": torch.__version__, "dataset": dataset,
            "cuda_version": str(torch.version.cuda)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


def params_with_max_lr(flat: dict[str, Any], max_lr: float) -> dict[str, Any]:
    """The params to log for a training to ``max_lr``: with ``schedule.max_lr: auto``, the LR used as
    ``schedule.max_lr_used`` (a number set in params would only be repeated)."""
    return {**flat, "schedule.max_lr_used": max_lr} if flat.get("schedule.max_lr") == "auto" else flat


def log_params_flat(flat: dict[str, Any]) -> None:
    """Log dotted params to the active run, batched (MLflow limits a batch to 100); credentials are masked."""
    from onecycle.core.redact import redact

    mlf = mlflow()
    items = {k: ("null" if v is None else json.dumps(v) if isinstance(v, list | dict) else v)
             for k, v in redact(flat).items()}
    keys = sorted(items)
    for i in range(0, len(keys), 100):
        mlf.log_params({k: items[k] for k in keys[i:i + 100]})


class RunLogger:
    """Logs metrics to one MLflow run in batches; if the store is locked or unreachable, keeps them and retries.

    ``datasets`` (split -> MLflow dataset, as :func:`datasets` gives) links each metric named ``<split>/...``
    (``val/top1``, ``train/loss``) to its split's dataset: MLflow 3's ``dataset_name`` and ``dataset_digest``
    of a metric. MLflow 3.17's stores keep that link, and the model's, for the metrics of a logged model (its
    page, ``search_logged_models``); a run's own metric history keeps neither.
    With ``run_id`` None (a DDP rank other than 0, a bare ``fit``) it logs nothing.
    """

    def __init__(self, run_id: str | None, datasets: dict[str, Any] | None = None):
        self.run_id = run_id
        self.datasets = dict(datasets or {})
        self.pending: list = []
        self.warned = False

    def existing_steps(self, key: str) -> set[int]:
        if self.run_id is None:
            return set()
        try:
            return {m.step for m in mlflow().MlflowClient().get_metric_history(self.run_id, key)}
        except Exception:  # a store we cannot read now: assume nothing was logged (duplicates beat gaps)
            return set()

    def log(self, metrics: dict[str, float], step: int, model_id: str | None = None,
            timestamps: dict[str, int] | None = None) -> None:
        """Keep ``metrics`` at ``step`` for the next flush, linked to ``model_id`` when given and to their split's
        dataset; ``timestamps`` (key -> ms) reuses a point's time (the same point is then not logged twice)."""
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None or not math.isfinite(float(v)):
                continue
            dataset = self.datasets.get(k.split("/", 1)[0]) if "/" in k else None
            self.pending.append(Metric(k, float(v), (timestamps or {}).get(k, now), step, model_id=model_id,
                                       dataset_name=dataset.name if dataset else None,
                                       dataset_digest=dataset.digest if dataset else None))

    def log_series(self, series: dict[str, list[float]]) -> None:
        """Per-step curves (step = index in the list)."""
        for key, values in series.items():
            for i, v in enumerate(values):
                self.log({key: v}, step=i)

    def flush(self, patient: bool = False) -> bool:
        """Send the kept values; on failure keep them (False). Only a ``patient`` flush (the end of a training)
        waits out MLflow's own HTTP retries (7 with backoff, ~4 minutes against a server that is down, or
        what ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``_TIMEOUT`` say); the others try briefly
        (:data:`~onecycle.tracking.store.BRIEF_RETRIES`)
        so that training goes on while a tracking server restarts."""
        if self.run_id is None or not self.pending:
            self.pending.clear()
            return True
        client = mlflow().MlflowClient()
        sent = 0
        try:
            with contextlib.nullcontext() if patient else brief_http_retries():
                while self.pending:
                    chunk = self.pending[:1000]
                    client.log_batch(self.run_id, metrics=chunk)
                    del self.pending[:len(chunk)]
                    sent += len(chunk)
        except Exception as exc:  # said once per outage; the count grows in the debug log
            (log.debug if self.warned else log.warning)(
                "MLflow is not reachable (%s); %d metric values kept and retried after the next epoch",
                " ".join(str(exc).split())[:160], len(self.pending))
            self.warned = True
            return False
        if self.warned:
            log.warning("MLflow is reachable again; the kept metrics were logged (%d values)", sent)
            self.warned = False
        return True


def log_epoch(logger: RunLogger, row: dict, steps: list[Step], *, skip_epochs: Collection[int] = (),
              skip_steps: Collection[int] = ()) -> None:
    """Log one epoch's record (at step = the epoch number) and its optimizer steps' LR and momentum (at step =
    the optimizer step) to the logger's run, then flush. Train and tune log their epochs through this alone;
    ``skip_epochs`` / ``skip_steps`` are what a resumed run already holds."""
    if row["epoch"] not in skip_epochs:
        logger.log(row_metrics(row), step=row["epoch"])
    for s in steps:
        if s.step not in skip_steps:
            logger.log({"lr": s.lr, "momentum": s.momentum}, step=s.step)
    logger.flush()


def onecycle_metadata(model_uri: str) -> dict:
    """The ``onecycle`` metadata of a logged or registered model (classes, preprocessing, its runtime, ...)."""
    return (mlflow().models.get_model_info(model_uri).metadata or {}).get("onecycle") or {}
