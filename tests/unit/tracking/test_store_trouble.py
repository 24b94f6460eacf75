"""The tracking store interrupted, busy, down or broken, a full disk, and tune workers killed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny import tiny_params, write_fetched

MODEL = "trouble-resnet"


def _client(work: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    return mlflow.MlflowClient()


def _trained(tmp_path, monkeypatch, **sections):
    """A tiny model trained in tmp_path (the cwd) and registered as MODEL; (params, workspace, run id)."""
    from onecycle.config import load_params
    from onecycle.core.paths import Workspace
    from onecycle.stages import train
    from onecycle.stages.command import guarded

    write_fetched(tmp_path / "data", n_train=600, n_test=60)
    monkeypatch.chdir(tmp_path)
    tiny_params(tmp_path, train={"epochs": 1},
                mlflow={"registered_model": MODEL, "system_metrics": False}, **sections)
    params, ws = load_params(tmp_path / "params.yaml"), Workspace(tmp_path)
    assert guarded("train", lambda: train.run(params, ws)) == 0
    return params, ws, json.loads((tmp_path / "reports/runs.json").read_text())["train"]


def _evaluate(params, ws) -> int:
    from onecycle.stages import evaluate
    from onecycle.stages.command import guarded

    return guarded("evaluate", lambda: evaluate.run(params, ws) and 0)


def _publish(params, ws) -> int:
    from onecycle.stages import publish
    from onecycle.stages.command import guarded

    return guarded("publish", lambda: publish.run(params, ws) and 0)


def _candidate(client) -> str | None:
    try:
        alias = client.get_registered_model(MODEL).aliases.get("candidate")
    except Exception:  # not registered yet: publish registers it
        return None
    return None if alias is None else str(alias)


# ------------------------------------------------------------------ item 2: evaluate interrupted while logging

@pytest.mark.slow
def test_ctrl_c_while_evaluate_logs_leaves_the_training_run_finished_and_a_rerun_marks_the_candidate(
        tmp_path, monkeypatch, capsys):
    import mlflow

    params, ws, run_id = _trained(tmp_path, monkeypatch)
    real = mlflow.MlflowClient.log_artifact

    def ctrl_c(*args, **kwargs):  # Ctrl-C lands while evaluate uploads its reports to the training's run
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", ctrl_c)
    assert _evaluate(params, ws) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "onecycle evaluate: interrupted"
    client = _client(tmp_path)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _candidate(client) is None
    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", real)
    assert _evaluate(params, ws) == 0
    client = _client(tmp_path)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test_top1" in run.data.metrics
    assert _publish(params, ws) == 0  # the evaluated model, registered and @candidate
    assert _candidate(_client(tmp_path)) == "1"
    assert {f.path for f in client.list_artifacts(run_id, "evaluate")} >= {"evaluate/metrics.json",
                                                                           "evaluate/per_class.json"}


# ------------------------------------------------------------------ item 3: the store busy, down or broken

def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    return errors[0]


def _store_with_a_model(tmp_path, monkeypatch):
    """An MLflow store (tmp_path/mlflow.db) whose registry holds MODEL; params naming it; tmp_path is the cwd."""
    from onecycle.tracking import store

    monkeypatch.chdir(tmp_path)
    write_fetched(tmp_path / "data", n_train=300, n_test=60)
    tiny_params(tmp_path, mlflow={"registered_model": MODEL})
    store.configure("test", tmp_path)
    _client(tmp_path).create_registered_model(MODEL)
    return tmp_path / "mlflow.db"


@pytest.fixture()
def locked_store(tmp_path, monkeypatch):
    """The store, held under an exclusive SQLite lock by another process for the whole test."""
    import subprocess
    import sys

    db = _store_with_a_model(tmp_path, monkeypatch)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; con = sqlite3.connect(sys.argv[1], isolation_level=None); "
         "con.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()", str(db)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield db
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_a_store_locked_by_another_process_is_one_line_in_train_and_promote(locked_store, monkeypatch, capsys):
    from onecycle.stages import promote, train

    monkeypatch.setattr("onecycle.tracking.store.SQLITE_BUSY_SECONDS", 1)  # the lock is held for good here
    uri = f"sqlite:///{locked_store}"
    for stage in (promote, train):
        assert stage.main(["--params", "params.yaml"]) == 1
        line = _one_error_line(capsys.readouterr().err)
        assert line.endswith(f"the MLflow store {uri} is locked by another process (retry when it is free)")
    assert not (locked_store.parent / "checkpoints/last.pt").exists()  # refused before training


def test_a_corrupt_store_is_one_line_in_train_and_promote(tmp_path, monkeypatch, capsys):
    from onecycle.stages import promote, train

    db = _store_with_a_model(tmp_path, monkeypatch)
    db.write_bytes(b"\x13\x37 not an sqlite file " * 200)
    for stage in (promote, train):
        assert stage.main(["--params", "params.yaml"]) == 1
        line = _one_error_line(capsys.readouterr().err)
        assert f"is not an MLflow database or is corrupt: {db}" in line


class _SilentServer:
    """A loopback TCP port that accepts connections and closes them at once, counting them: a server that
    is up but does not answer (a closed port answers 'connection refused', which is the same to MLflow)."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.mark.parametrize("server", ["closed port", "silent"])
def test_a_tracking_server_that_does_not_answer_is_refused_in_one_line_after_few_attempts(
        server, tmp_path, monkeypatch, capsys):
    from conftest import free_port
    from onecycle.stages import promote

    silent = _SilentServer() if server == "silent" else None
    uri = f"http://127.0.0.1:{silent.port if silent else free_port()}"
    monkeypatch.chdir(tmp_path)
    tiny_params(tmp_path, mlflow={"registered_model": MODEL})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert promote.main(["--params", "params.yaml"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"the MLflow tracking server {uri} does not answer" in line
    if silent:
        assert 1 <= silent.connections <= 2  # one try and one retry, not MLflow's 7 retries with backoff
        silent.sock.close()


@pytest.mark.slow
def test_evaluate_refuses_a_deleted_training_run_in_one_line_before_its_reports(tmp_path, monkeypatch, capsys):
    from onecycle.stages import evaluate

    params, ws, run_id = _trained(tmp_path, monkeypatch)
    _client(tmp_path).delete_run(run_id)
    capsys.readouterr()
    assert evaluate.main(["--params", "params.yaml"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"the training's MLflow run {run_id}" in line and "was deleted" in line
    assert not ws.metrics_json.exists()


# ------------------------------------------------------------------ item 4: a full disk (a file size limit)

LIMIT = 256 * 1024  # bytes a process may write to one file (RLIMIT_FSIZE)
WRITER = """
import sys
from pathlib import Path

import torch

from onecycle.core.files import atomic_write_text, save_figure
from onecycle.stages.command import guarded
from onecycle.training import checkpoint as ckpt

what, path = sys.argv[1], Path(sys.argv[2])
size = int(sys.argv[3])


def write():
    if what == "checkpoint":
        ckpt.save({"epoch": 2, "w": torch.zeros(size // 4)}, path)
    elif what == "report":
        atomic_write_text(path, "x" * size)
    elif what == "figure":
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        fig, ax = plt.subplots()
        ax.imshow(np.random.default_rng(0).random((600, 600)))
        save_figure(fig, path, dpi=300)
    else:
        from onecycle.tracking import store
        store.configure(None, path.parent)
        from onecycle.tracking import runs
        runs.log_artifact(path, "evaluate", run_id=sys.argv[4])


sys.exit(guarded("train", write))
"""


def _write_limited(work: Path, *args: str, limit: int | None = LIMIT):
    import resource
    import signal
    import subprocess
    import sys

    def file_size_limit():  # write() past the limit fails with EFBIG (SIGXFSZ ignored, or it kills the process)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-c", WRITER, *args], cwd=work, capture_output=True, text=True,
                          timeout=300, preexec_fn=file_size_limit if limit else None)


def test_a_checkpoint_past_the_file_size_limit_is_one_line_and_the_previous_one_is_intact(tmp_path):
    from onecycle.training import checkpoint as ckpt

    path = tmp_path / "checkpoints/last.pt"
    ckpt.save({"epoch": 1}, path)
    done = _write_limited(tmp_path, "checkpoint", str(path), str(4 * LIMIT))
    assert done.returncode == 1
    assert _one_error_line(done.stderr) == (f"onecycle train: error: could not write {path}: the file size limit is "
                                            "reached (File too large; see `ulimit -f`); the previous checkpoint is intact")
    assert ckpt.load(path)["epoch"] == 1 and [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert _write_limited(tmp_path, "checkpoint", str(path), str(4 * LIMIT), limit=None).returncode == 0  # rerun
    assert ckpt.load(path)["epoch"] == 2


@pytest.mark.parametrize("what", ["report", "figure", "artifact"])
def test_a_report_figure_or_mlflow_artifact_past_the_file_size_limit_is_one_line_naming_it(what, tmp_path):
    source = tmp_path / "big.bin"
    args = []
    if what == "artifact":
        source.write_bytes(b"\\x01" * 4 * LIMIT)
        from onecycle.tracking import store

        store.configure("test", tmp_path)
        client = store.mlflow().MlflowClient()
        run = client.create_run(client.get_experiment_by_name("test").experiment_id)
        args = [run.info.run_id]
        target = Path(run.info.artifact_uri.removeprefix("file://")) / "evaluate" / source.name
    else:
        target = tmp_path / ("reports/metrics.json" if what == "report" else "reports/confusion_matrix.png")
    done = _write_limited(tmp_path, what, str(source if what == "artifact" else target), str(4 * LIMIT), *args)
    assert done.returncode == 1
    assert _one_error_line(done.stderr) == (f"onecycle train: error: file size limit reached writing {target} "
                                            "(File too large; see `ulimit -f`)")
