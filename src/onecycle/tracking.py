"""MLflow, in one place: where the store is, how runs are opened, what every run carries, and batched logging.

The store is MLflow's own default, so that a bare ``mlflow ui``, ``mlflow models serve`` and notebooks see
the runs with no flags: ``mlflow.db`` (SQLite metadata) at the workspace root, artifacts under the
top-level ``mlruns/`` (``mlruns/artifacts``). ``MLFLOW_TRACKING_URI`` overrides (a team server). A store of an earlier version
at ``mlruns/mlflow.db`` is moved to ``mlflow.db`` the first time it is opened (same SQLite file, same
artifact locations). Experiments that DVC runs in a temporary copy of the repo (``dvc exp run --temp`` /
``--queue``) still log to the workspace's store: DVC passes the workspace as ``DVC_ROOT``.

Metric values are buffered (:class:`RunLogger`) and sent in batches; if the store is locked or
unreachable they are kept and retried at the next flush. No other module imports ``mlflow`` at load time.
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
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STORE = "mlflow.db"          # MLflow 3's default store, relative to the workspace root
ARTIFACTS = Path("mlruns") / "artifacts"  # under the top-level mlruns/ folder MLflow's users know
LEGACY_STORE = Path("mlruns") / "mlflow.db"  # onecycle 0.1's location
# The experiment tag MLflow 3 reads for the experiment's kind: "Model training", not "GenAI apps & agents".
# MLflow 3.17's UI follows its GenAI / Model-training switch instead (a new browser starts on GenAI), so
# the link to the runs page (runs_page_url) also carries ?workflowType=machine_learning.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
SYSTEM_METRICS_INTERVAL = 2.0  # seconds between system-metric samples (MLflow's 10 s misses short runs)
# MLflow's context names for a run's datasets (the mlflow.data.context input tag), per split
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def workspace_root(start: Path | None = None) -> Path:
    """The project's workspace: DVC_ROOT when DVC runs us, else the nearest folder with .dvc or .git."""
    here = (start or Path.cwd()).resolve()
    env = os.environ.get("DVC_ROOT")
    if env and here == Path.cwd().resolve():
        return Path(env).resolve()
    for folder in (here, *here.parents):
        if folder.name == ".dvc":  # inside .dvc/tmp/exps/...: the workspace is the folder holding .dvc
            return folder.parent
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here


def default_tracking_uri(root: Path | None = None) -> str:
    root = (root or workspace_root()).resolve()
    return f"sqlite:///{root / STORE}"


# URIs this process chose itself. mlflow.set_tracking_uri() copies its argument into the
# MLFLOW_TRACKING_URI environment variable, which must not then pass for the user's choice.
_SET_BY_US: set[str] = set()


def user_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI when the user set it (a team server), else None."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri and uri not in _SET_BY_US else None


def _holds_no_runs(db: Path) -> bool:
    """Whether a SQLite file is an MLflow store with no runs (what a bare ``mlflow ui`` leaves), or empty."""
    import sqlite3

    if db.stat().st_size == 0:
        return True
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    except sqlite3.Error:  # not an MLflow store: leave it alone
        return False


def _migrate_legacy_store(root: Path) -> None:
    old, new = root / LEGACY_STORE, root / STORE
    if old.is_file() and new.is_file() and _holds_no_runs(new):
        # a bare `mlflow ui` run before this version created an empty ./mlflow.db: the old store replaces it
        os.replace(new, new.with_name(STORE + ".empty"))
    if old.is_file() and new.exists():
        log.warning("%s (an earlier onecycle's store) is not read: %s holds runs too", old, new)
    elif old.is_file():
        os.replace(old, new)
        log.warning("moved the MLflow store %s to %s (MLflow's default location; artifacts stay in %s/)",
                    old, new, ARTIFACTS)


def mlflow():
    """The ``mlflow`` module, imported on first use (2 s) and quietened."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow as _mlflow

    warnings.filterwarnings("ignore", module="mlflow")
    return _mlflow


def configure(experiment: str | None, root: Path | None = None) -> str | None:
    """Point MLflow at the project's store and select ``experiment`` (None: only the store); return its id.

    For a SQLite store this holds a file lock: MLflow creates a fresh store's tables without one, and
    two processes starting together (tune workers, queued DVC experiments) would both try.
    """
    from filelock import FileLock

    uri = user_tracking_uri()
    root = workspace_root(Path(root) if root is not None else None)
    if not uri:
        root.mkdir(parents=True, exist_ok=True)
        _migrate_legacy_store(root)
        uri = default_tracking_uri(root)
        _SET_BY_US.add(uri)
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return _configure(uri, experiment, root)
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=600):
        return _configure(uri, experiment, root)


def _configure(uri: str, experiment: str | None, root: Path) -> str | None:
    mlf = mlflow()
    mlf.set_tracking_uri(uri)
    if experiment is None:
        return None
    client = mlf.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = (root / ARTIFACTS).as_uri() if uri in _SET_BY_US else None
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location)
        except Exception:  # another process created it between our look-up and create
            exp_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":  # deleted in the UI: a run needs it, and its name is still taken
            client.restore_experiment(exp_id)
            log.warning("the MLflow experiment %r had been deleted: restored it to log this run", experiment)
    if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlf.set_experiment(experiment_id=exp_id)
    return exp_id


def runs_page_url(experiment_id: str, port: int = 5000, host: str = "127.0.0.1") -> str:
    """The experiment's runs table in ``mlflow ui``, in MLflow's Model-training view."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_link(port: int = 5000, params_path: str | Path = "params.yaml") -> str:
    """What ``make ui`` prints: the runs page of ``mlflow.experiment`` in the workspace's store."""
    from .config import load_params

    experiment = load_params(params_path).mlflow.experiment if Path(params_path).is_file() else "onecycle"
    return f"MLflow UI: {runs_page_url(_stored_experiment_id(experiment) or configure(experiment), port)}"


def _stored_experiment_id(experiment: str) -> str | None:
    """The experiment's id read straight from the workspace's SQLite store (no 2-40 s MLflow import), or None."""
    import sqlite3

    root = workspace_root()
    _migrate_legacy_store(root)
    db = root / STORE
    if user_tracking_uri() or not db.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            row = con.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                              (experiment,)).fetchone()
            tagged = row and con.execute("SELECT 1 FROM experiment_tags WHERE experiment_id = ? AND key = ?",
                                         (row[0], EXPERIMENT_KIND_TAG)).fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if tagged else None  # not there or not tagged yet: configure() does both


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

    from .data import dataset_dir, workspace_relative

    folder = dataset_dir(data_cfg, root)
    files = json.loads((folder / "meta.json").read_text()).get("files") or {}
    return {split: MetaDataset(LocalArtifactDatasetSource(workspace_relative(folder, root)), name=f"{data_cfg.dataset}-{split}",
                               digest=split_digest(files, split, data_cfg.val_size, data_cfg.train_subset,
                                                   split_seed))
            for split in splits}


def log_datasets(found: dict[str, Any]) -> None:
    """Log datasets (split -> mlflow dataset) to the active run as its inputs, with MLflow's context names."""
    mlf = mlflow()
    splits = list(found)
    mlf.log_inputs([found[s] for s in splits], contexts=[DATASET_CONTEXTS[s] for s in splits],
                   tags_list=[None] * len(splits))


def model_of_run(run_id: str, name: str = "model") -> str | None:
    """The id of the model named ``name`` that a run logged (the registered image classifier by default; if
    none has that name, the one it logged last), or None."""
    client = mlflow().MlflowClient()
    outputs = client.get_run(run_id).outputs
    ids = [m.model_id for m in (outputs.model_outputs if outputs else [])]
    for model_id in reversed(ids):
        try:
            if client.get_logged_model(model_id).name == name:
                return model_id
        except Exception:  # a model the store cannot return: fall back to the last one
            break
    return ids[-1] if ids else None


def git_info(root: Path | None = None) -> dict[str, str]:
    root = root or Path.cwd()

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown", "git_dirty": str(bool(dirty)).lower()}


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


def log_params_flat(flat: dict[str, Any]) -> None:
    """Log dotted params to the active run, batched (MLflow limits a batch to 100); credentials are masked."""
    from .redact import redact

    mlf = mlflow()
    items = {k: ("null" if v is None else json.dumps(v) if isinstance(v, list | dict) else v)
             for k, v in redact(flat).items()}
    keys = sorted(items)
    for i in range(0, len(keys), 100):
        mlf.log_params({k: items[k] for k in keys[i:i + 100]})


# A flush between epochs: one retry, no backoff, 10 s to answer (MLflow reads these at every request).
BRIEF_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def _brief_http_retries():
    saved = {k: os.environ.get(k) for k in BRIEF_RETRIES}
    os.environ.update(BRIEF_RETRIES)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RunLogger:
    """Logs metrics to one MLflow run in batches; if the store is locked or unreachable, keeps them and retries.

    With ``run_id`` None (a DDP rank other than 0, a bare ``fit``) it logs nothing.
    """

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self.pending: list = []
        self.warned = False

    def existing_steps(self, key: str) -> set[int]:
        if self.run_id is None:
            return set()
        try:
            return {m.step for m in mlflow().MlflowClient().get_metric_history(self.run_id, key)}
        except Exception:  # a store we cannot read now: assume nothing was logged (duplicates beat gaps)
            return set()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()
                         if v is not None and math.isfinite(float(v))]

    def log_series(self, series: dict[str, list[float]]) -> None:
        """Per-step curves (step = index in the list)."""
        for key, values in series.items():
            for i, v in enumerate(values):
                self.log({key: v}, step=i)

    def flush(self, patient: bool = False) -> bool:
        """Send the kept values; on failure keep them (False). Only a ``patient`` flush (the end of a training)
        waits out MLflow's own HTTP retries (7 with backoff, ~4 minutes against a server that is down, or
        what ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``_TIMEOUT`` say); the others try briefly (:data:`BRIEF_RETRIES`)
        so that training goes on while a tracking server restarts."""
        if self.run_id is None or not self.pending:
            self.pending.clear()
            return True
        client = mlflow().MlflowClient()
        sent = 0
        try:
            with contextlib.nullcontext() if patient else _brief_http_retries():
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
