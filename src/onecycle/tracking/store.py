"""Where MLflow's store is, and the one import of ``mlflow``: the workspace's default store, a user's
``MLFLOW_TRACKING_URI``, the experiment a stage logs to, and the UI's link to it.

The store is MLflow's own default, so that a bare ``mlflow ui``, ``mlflow models serve`` and notebooks see
the runs with no flags: ``mlflow.db`` (SQLite metadata) at the workspace root, artifacts under the
top-level ``mlruns/`` (``mlruns/artifacts``). ``MLFLOW_TRACKING_URI`` overrides (a team server). Experiments that
DVC runs in a temporary copy of the repo (``dvc exp run --temp`` / ``--queue``) still log to the workspace's store:
DVC passes the workspace as ``DVC_ROOT``.

No module imports ``mlflow`` at load time: :func:`mlflow` imports it on first use.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sqlite3
import warnings
from pathlib import Path

from onecycle.core.errors import OneCycleError

log = logging.getLogger(__name__)

STORE = "mlflow.db"          # MLflow 3's default store, relative to the workspace root
ARTIFACTS = Path("mlruns") / "artifacts"  # under the top-level mlruns/ folder MLflow's users know
# The experiment tag MLflow 3 reads for the experiment's kind: "Model training", not "GenAI apps & agents".
# MLflow 3.17's UI follows its GenAI / Model-training switch instead (a new browser starts on GenAI), so
# the link to the runs page (runs_page_url) also carries ?workflowType=machine_learning.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A quick request: one retry, no backoff, 10 s to answer (MLflow reads these at every request). Without them a
# server that is down costs MLflow's 7 retries with backoff, about 4 minutes, before any error.
BRIEF_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
SQLITE_BUSY_SECONDS = 10  # how long the store check waits for another process's write lock on mlflow.db


class StoreError(OneCycleError):
    """The MLflow store is locked, down, or not an MLflow store; the message names it (credentials masked)."""


@contextlib.contextmanager
def brief_http_retries():
    """MLflow's HTTP requests in this block try briefly (:data:`BRIEF_RETRIES`)."""
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
    """MLflow's default store for the workspace at ``root``: ``sqlite:///<root>/mlflow.db``."""
    root = (root or workspace_root()).resolve()
    return f"sqlite:///{root / STORE}"


# URIs this process chose itself. mlflow.set_tracking_uri() copies its argument into the
# MLFLOW_TRACKING_URI environment variable, which must not then pass for the user's choice.
_SET_BY_US: set[str] = set()


def user_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI when the user set it (a team server), else None."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri and uri not in _SET_BY_US else None


def mlflow():
    """The ``mlflow`` module, imported on first use (2 s) and quietened."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow as _mlflow

    warnings.filterwarnings("ignore", module="mlflow")
    return _mlflow


@contextlib.contextmanager
def without_event_lines():
    """MLflow's own progress lines (``Successfully registered model``, ``Created version``) are not printed in this
    block: the command's line says what was registered."""
    from mlflow.utils import logging_utils

    class _Unprinted(io.StringIO):
        enabled = False  # MLflow turns its stream back on (enable_logging) while it validates the model: no effect here

    # eprint() writes to the module's stream as it finds it at each call; MLflow has no switch for these lines alone
    saved = logging_utils.MLFLOW_LOGGING_STREAM
    logging_utils.MLFLOW_LOGGING_STREAM = _Unprinted()
    try:
        yield
    finally:
        logging_utils.MLFLOW_LOGGING_STREAM = saved


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
        uri = default_tracking_uri(root)
        _SET_BY_US.add(uri)
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        check_server(uri)
        return _configure(uri, experiment, root)
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    check_sqlite(db, uri)
    with FileLock(str(db) + ".lock", timeout=600):
        return _configure(uri, experiment, root)


def check_server(uri: str) -> None:
    """Refuse in one line, within seconds, a tracking server (http/https URI) that does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    from onecycle.core.redact import one_line, redact

    mlf = mlflow()
    try:
        with brief_http_retries():
            mlf.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # connection refused, a timeout, a 5xx: MLflow wraps them all
        raise StoreError(f"the MLflow tracking server {redact(uri)} does not answer ({one_line(exc)[:200]}); "
                         "start it, or unset MLFLOW_TRACKING_URI to use the workspace's mlflow.db") from None


def check_sqlite(db: Path, uri: str) -> None:
    """Refuse in one line a SQLite store that another process holds locked (after :data:`SQLITE_BUSY_SECONDS`),
    a file that is not an SQLite database (corrupt), or an SQLite database that is not an MLflow store.

    Reads only the schema, and takes the write lock for an instant when the file is writable (no write), so a
    lock that would stop MLflow's first write is found here. A missing or empty file is a new store.
    """
    if not db.is_file() or db.stat().st_size == 0:
        return
    writable = os.access(db, os.W_OK) and os.access(db.parent, os.W_OK)
    try:
        con = sqlite3.connect(f"file:{db}?mode={'rw' if writable else 'ro'}", uri=True,
                              timeout=SQLITE_BUSY_SECONDS, isolation_level=None)
        try:
            if writable:
                con.execute("BEGIN IMMEDIATE")
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if writable:
                con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise StoreError(f"the MLflow store {uri} is locked by another process (retry when it is free)") from None
        raise StoreError(f"the MLflow store {uri} cannot be opened ({exc})") from None
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        raise StoreError(f"the MLflow store {uri} is not an MLflow database or is corrupt: {db} ({exc}); "
                         "move it away to start a new store, or restore it from a backup") from None
    if tables and "experiments" not in tables:
        raise StoreError(f"the MLflow store {uri} is not an MLflow database or is corrupt: {db} (an SQLite "
                         "database without MLflow's tables); move it away, or set MLFLOW_TRACKING_URI")


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


def tracking_uri() -> str:
    """The store MLflow logs to now (what :func:`configure` chose), credentials masked: for messages."""
    from onecycle.core.redact import redact

    return redact(mlflow().get_tracking_uri())


def runs_page_url(experiment_id: str, port: int = 5000, host: str = "127.0.0.1") -> str:
    """The experiment's runs table in ``mlflow ui``, in MLflow's Model-training view."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def wait_for_ui(port: int, server_pid: int | None = None, seconds: float = 600, host: str = "127.0.0.1") -> None:
    """Return once ``mlflow ui`` on ``port`` answers its health check; one line if the server (``server_pid``) exits
    first or does not answer within ``seconds``."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2):
                return
        except OSError:  # not listening yet, or starting its workers
            pass
        if server_pid is not None:
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                raise OneCycleError(f"mlflow ui exited before it answered on port {port} (see its lines above)") from None
        time.sleep(0.5)
    raise OneCycleError(f"mlflow ui did not answer on port {port} within {seconds:.0f} s")


def ui_link(port: int = 5000, params_path: str | Path = "params.yaml") -> str:
    """What ``make ui`` prints once the server answers (:func:`wait_for_ui`): the runs page of ``mlflow.experiment``
    in the workspace's store (made ready here, before the server starts, so the two never create it at once)."""
    from onecycle.config import load_params

    experiment = load_params(params_path).mlflow.experiment if Path(params_path).is_file() else "onecycle"
    return f"MLflow UI: {runs_page_url(configure(experiment), port)}"

