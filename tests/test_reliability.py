"""Interruptions, torn files, untrusted files, tracking trouble and a full disk."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from onecycle import checkpoint as ckpt
from tiny import tiny_params, write_fetched

BIN = Path(sys.executable).parent


def _client(work: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    return mlflow.MlflowClient()


def _start_training(work: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([BIN / "onecycle", "train"], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_line(proc: subprocess.Popen, prefix: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"training ended before {prefix!r}: {proc.stderr.read()[-2000:]}")
    raise AssertionError(f"no {prefix!r} within {seconds}s")


def _workdir(base: Path, name: str) -> Path:
    work = base / name
    write_fetched(work / "data", n_train=2200, n_test=100)
    # ~32 steps an epoch of a half-width ResNet9: a few seconds, so a signal lands mid-epoch
    tiny_params(work, model={"width": 0.5}, train={"epochs": 3})
    return work


def _outcome(work: Path) -> dict:
    summary = json.loads((work / "reports/train.json").read_text())
    client = _client(work)
    run_id = summary["mlflow_run_id"]
    with open(work / "reports/history.csv") as f:
        rows = list(csv.DictReader(f))
    return {
        "run_id": run_id,
        "model": ckpt.load(work / "models/model.pt")["state_dict"],
        "epochs": [r["epoch"] for r in rows],
        "val_top1": [r["val_top1"] for r in rows],
        "val_steps": [m.step for m in client.get_metric_history(run_id, "val/top1")],
        "lr_steps": [m.step for m in client.get_metric_history(run_id, "lr")],
        "runs": len(client.search_runs([client.get_experiment_by_name("test").experiment_id])),
        "status": client.get_run(run_id).info.status,
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    work = _workdir(tmp_path_factory.mktemp("straight"), "w")
    proc = _start_training(work)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    return _outcome(work)


def _check_resumed(out: dict, straight: dict) -> None:
    assert out["status"] == "FINISHED" and out["runs"] == 1
    assert out["epochs"] == ["1", "2", "3"]
    assert sorted(out["val_steps"]) == [1, 2, 3]  # no duplicated or missing epoch rows in MLflow
    steps_per_run = len(straight["lr_steps"])
    assert sorted(out["lr_steps"]) == list(range(steps_per_run))  # every step once
    assert out["val_top1"] == straight["val_top1"]
    for k, v in straight["model"].items():
        assert torch.equal(v, out["model"][k]), k


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(tmp_path, uninterrupted):
    work = _workdir(tmp_path, "w")
    proc = _start_training(work)
    _wait_for_line(proc, "epoch 1/3")
    time.sleep(1.0)  # into epoch 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    err = proc.stderr.read()
    assert "SIGTERM received" in err and "run `onecycle train` (or `dvc repro`) again to resume" in err
    state = ckpt.load(work / "checkpoints/last.pt")
    assert state["epoch"] >= 1
    run_id = state["mlflow_run_id"]
    assert _client(work).get_run(run_id).info.status == "KILLED"
    proc = _start_training(work)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    out = _outcome(work)
    assert out["run_id"] == run_id  # the same MLflow run continued
    _check_resumed(out, uninterrupted)


@pytest.mark.slow
def test_kill_9_loses_at_most_the_epoch_in_progress(tmp_path, uninterrupted):
    work = _workdir(tmp_path, "w")
    proc = _start_training(work)
    _wait_for_line(proc, "epoch 1/3")
    time.sleep(0.5)
    proc.kill()
    proc.wait(timeout=60)
    assert ckpt.load(work / "checkpoints/last.pt")["epoch"] >= 1
    proc = _start_training(work)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    _check_resumed(_outcome(work), uninterrupted)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoints_never_run_code_from_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(ckpt.CheckpointError, match="evil.pt is not a readable checkpoint"):
        ckpt.load(path)
    assert not (tmp_path / "pwned").exists()


def test_a_file_that_is_not_a_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from onecycle.evaluate import main

    write_fetched(tmp_path / "data", n_train=300, n_test=50)
    monkeypatch.chdir(tmp_path)
    tiny_params(tmp_path)
    (tmp_path / "models").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "models/model.pt")
    assert main(["--params", "params.yaml"]) == 1
    assert "models/model.pt is not a onecycle model file" in capsys.readouterr().err
    (tmp_path / "models/model.pt").write_bytes(b"\x00" * 100)
    assert main(["--params", "params.yaml"]) == 1
    assert "models/model.pt is not a readable checkpoint" in capsys.readouterr().err


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save({"epoch": 1}, path)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="the disk is full; the previous checkpoint is intact"):
        ckpt.save({"epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


@pytest.mark.slow
def test_disk_full_during_training_is_a_clear_error_and_the_run_is_marked(tmp_path, monkeypatch, capsys):
    from onecycle import train as train_mod

    write_fetched(tmp_path / "data", n_train=600, n_test=100)
    monkeypatch.chdir(tmp_path)
    tiny_params(tmp_path, train={"epochs": 3})
    real_save = torch.save
    calls = {"last": 0}

    def fill_up(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:
            calls["last"] += 1
            if calls["last"] == 2:  # the epoch-2 checkpoint
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_up)
    assert train_mod.main(["--params", "params.yaml"]) == 1
    assert "could not write checkpoints/last.pt: the disk is full" in capsys.readouterr().err
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.load(tmp_path / "checkpoints/last.pt")["epoch"] == 1
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.slow
def test_an_unreachable_tracking_store_does_not_lose_epochs(tmp_path, monkeypatch, caplog):
    import mlflow

    from onecycle.train import main

    write_fetched(tmp_path / "data", n_train=600, n_test=100)
    monkeypatch.chdir(tmp_path)
    tiny_params(tmp_path, train={"epochs": 3})
    real = mlflow.MlflowClient.log_batch
    calls = {"n": 0}

    def flaky(self, run_id, metrics=(), *args, **kwargs):
        calls["n"] += bool(metrics)
        if metrics and calls["n"] <= 2:  # the store is locked during epochs 1 and 2
            raise mlflow.exceptions.MlflowException("database is locked")
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", flaky)
    assert main(["--params", "params.yaml"]) == 0
    assert "MLflow is not reachable (database is locked)" in caplog.text
    assert "MLflow is reachable again" in caplog.text
    run_id = json.loads((tmp_path / "reports/train.json").read_text())["mlflow_run_id"]
    client = _client(tmp_path)
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/top1")) == [1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(run_id, "lr")) == list(range(24))


# ------------------------------------------------------------------------------------------ secrets

@pytest.mark.parametrize("text, masked", [
    ("postgresql://tuner:SECRET@db.example:5432/optuna", "postgresql://tuner:***@db.example:5432/optuna"),
    ("mysql+pymysql://u:SECRET@h/db?charset=utf8", "mysql+pymysql://u:***@h/db?charset=utf8"),
    ("postgresql://h/db?user=u&password=SECRET&sslmode=require", "postgresql://h/db?user=u&password=***&sslmode=require"),
    ("cannot open postgresql://:SECRET@h/db: refused", "cannot open postgresql://:***@h/db: refused"),
    ("token=SECRET api_key: SECRET", "token=*** api_key: ***"),
    ("http://host:8080/path and sqlite:///reports/optuna.db", "http://host:8080/path and sqlite:///reports/optuna.db"),
])
def test_redact_masks_credentials_and_nothing_else(text, masked):
    from onecycle.redact import redact

    assert redact(text) == masked
    assert redact({"a": [text], "b": 3}) == {"a": [masked], "b": 3}


def test_a_storage_password_never_reaches_mlflow_logs_or_reports(tmp_path, monkeypatch, capsys, caplog):
    """tune.storage with a password: train logs all params to MLflow; the password must not be among them."""
    import logging

    from onecycle import train as train_mod

    write_fetched(tmp_path / "data", n_train=300, n_test=50)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tiny_params(tmp_path, train={"epochs": 1},
                tune={"storage": "postgresql://tuner:SECRET_PW_123@db.example:5432/optuna"})
    assert train_mod.main(["--params", "params.yaml"]) == 0
    logging.getLogger("onecycle.test").warning("connecting to %s", "postgresql://tuner:SECRET_PW_123@db/x")
    out = capsys.readouterr()
    client = _client(tmp_path)
    run = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0]
    assert run.data.params["tune.storage"] == "postgresql://tuner:***@db.example:5432/optuna"
    stored = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "params.yaml"]
    assert tmp_path / "mlflow.db" in stored and any("mlruns" in p.parts for p in stored)
    leaks = [str(p.relative_to(tmp_path)) for p in stored if b"SECRET_PW_123" in p.read_bytes()]
    assert leaks == []
    assert "SECRET_PW_123" not in out.out + out.err + caplog.text
