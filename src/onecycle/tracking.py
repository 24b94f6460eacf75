"""MLflow: where the store is, how runs are opened, and what provenance every run carries.

The store is ``mlruns/mlflow.db`` (SQLite metadata) with artifacts in ``mlruns/artifacts``, at the
workspace root, unless ``MLFLOW_TRACKING_URI`` names another (a team server). Experiments that DVC
runs in a temporary copy of the repo (``dvc exp run --temp`` / ``--queue``) still log to the
workspace's store: DVC passes the workspace as ``DVC_ROOT``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def workspace_root(start: Path | None = None) -> Path:
    """The project's workspace: DVC_ROOT when DVC runs us, else the nearest folder with .dvc or .git."""
    env = os.environ.get("DVC_ROOT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if folder.name == ".dvc":  # inside .dvc/tmp/exps/...: the workspace is the folder holding .dvc
            return folder.parent
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here


def default_tracking_uri(root: Path | None = None) -> str:
    root = root or workspace_root()
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


# URIs this process chose itself. mlflow.set_tracking_uri() copies its argument into the
# MLFLOW_TRACKING_URI environment variable, which must not then pass for the user's choice.
_SET_BY_US: set[str] = set()


def user_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI when the user set it (a team server), else None."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri and uri not in _SET_BY_US else None


def configure(experiment: str) -> str:
    """Point MLflow at the project's store and select ``experiment``; return its id.

    For a SQLite store this holds a file lock: MLflow creates a fresh store's tables without one, and
    two processes starting together (tune workers, queued DVC experiments) would both try.
    """
    from filelock import FileLock

    uri = user_tracking_uri()
    if not uri:
        root = workspace_root()
        (root / "mlruns").mkdir(parents=True, exist_ok=True)
        uri = default_tracking_uri(root)
        _SET_BY_US.add(uri)
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return _configure(uri, experiment)
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=600):
        return _configure(uri, experiment)


def _configure(uri: str, experiment: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if uri in _SET_BY_US:
            location = (workspace_root() / "mlruns" / "artifacts").as_uri()
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location)
        except Exception:  # another process created it between our look-up and create
            exp_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


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


def provenance_tags(dataset: str, device_name: str) -> dict[str, str]:
    """Tags every run carries: git commit and dirty flag, DVC experiment, device, torch, dataset."""
    import torch

    tags = {**git_info(), "device": device_name, "torch_version": torch.__version__, "dataset": dataset,
            "cuda_version": str(torch.version.cuda)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


def log_params_flat(flat: dict[str, Any]) -> None:
    """Log dotted params, batched (MLflow limits a batch to 100)."""
    import mlflow

    items = {k: ("null" if v is None else json.dumps(v) if isinstance(v, list | dict) else v) for k, v in flat.items()}
    keys = sorted(items)
    for i in range(0, len(keys), 100):
        mlflow.log_params({k: items[k] for k in keys[i:i + 100]})


def quiet_mlflow() -> None:
    """MLflow warns about things users cannot act on (pip version inference, git, etc.)."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", module="mlflow")
