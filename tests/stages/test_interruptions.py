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

import numpy as np
import pytest
import torch

from onecycle.training import checkpoint as ckpt
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
    client = _client(work)
    run_id = json.loads((work / "reports/runs.json").read_text())["train"]
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
    from onecycle.stages.evaluate import main

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
    from onecycle.stages import train as train_mod

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

    from onecycle.stages.train import main

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
    run_id = json.loads((tmp_path / "reports/runs.json").read_text())["train"]
    client = _client(tmp_path)
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/top1")) == [1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(run_id, "lr")) == list(range(24))


# --- the edges of a run (finalization, short schedules, resume identity, locks, MLflow trouble) ---

def _tiny_train(tmp_path, monkeypatch, epochs: int = 2, **sections):
    from onecycle.config import load_params
    from onecycle.core.paths import Workspace

    write_fetched(tmp_path / "data", n_train=600, n_test=100)  # 472 train images: 8 steps an epoch
    monkeypatch.chdir(tmp_path)
    tiny_params(tmp_path, train={"epochs": epochs}, **sections)
    return load_params(tmp_path / "params.yaml"), Workspace(tmp_path)


def _train(params, ws, **kwargs) -> int:
    from onecycle.stages import train
    from onecycle.stages.command import guarded

    return guarded("train", lambda: train.run(params, ws, **kwargs))


def _step_failing_at(n: int, exc: BaseException):
    from onecycle.training.engine import train_step

    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return train_step(*args, **kwargs)
    return step


def _no_training(*args, **kwargs):
    raise AssertionError("trained again")


def _runs(work: Path, experiment: str = "test") -> list:
    client = _client(work)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def _logged_models(work: Path, run_id: str) -> list:
    import mlflow

    _client(work)
    exp_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    return [m for m in mlflow.search_logged_models(experiment_ids=[exp_id], output_format="list")
            if m.source_run_id == run_id]


@pytest.mark.slow
def test_ctrl_c_in_the_final_log_model_is_completed_in_the_same_run_without_training(tmp_path, monkeypatch, capsys):
    import mlflow.pytorch

    params, ws = _tiny_train(tmp_path, monkeypatch)
    real = mlflow.pytorch.log_model

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow.pytorch, "log_model", ctrl_c)
    assert _train(params, ws) == 130
    run_id = ckpt.load(tmp_path / "checkpoints/last.pt")["mlflow_run_id"]
    assert _client(tmp_path).get_run(run_id).info.status != "FINISHED"  # no model: not FINISHED
    assert "again to complete it without training again" in capsys.readouterr().err
    monkeypatch.setattr(mlflow.pytorch, "log_model", real)
    assert _train(params, ws, step_fn=_no_training) == 0
    runs = _runs(tmp_path)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    assert sorted(m.name for m in _logged_models(tmp_path, run_id)) == ["checkpoint-best", "network"]  # each once
    assert json.loads((tmp_path / "reports/runs.json").read_text())["train"] == run_id
    # finalized now: a third run trains again, from scratch, in a new run
    assert _train(params, ws) == 0
    assert len(_runs(tmp_path)) == 2


@pytest.mark.slow
def test_disk_full_writing_the_model_file_is_one_line_and_completed_later(tmp_path, monkeypatch, capsys):
    params, ws = _tiny_train(tmp_path, monkeypatch)
    seen = []

    def disk_full_at_outputs(name: str) -> None:
        seen.append(name)
        if name == "outputs":
            raise OSError(errno.ENOSPC, "No space left on device", "models/model.pt")

    assert _train(params, ws, finalize_hook=disk_full_at_outputs) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "finalization stopped at step 'outputs'" in err.strip().splitlines()[-1]
    run_id = ckpt.load(tmp_path / "checkpoints/last.pt")["mlflow_run_id"]
    assert _client(tmp_path).get_run(run_id).info.status == "FAILED"
    seen.clear()
    assert _train(params, ws, step_fn=_no_training, finalize_hook=seen.append) == 0
    assert seen == ["outputs", "metrics", "checkpoints", "reports", "network", "end_run"]
    assert _client(tmp_path).get_run(run_id).info.status == "FINISHED"
    assert ckpt.load(tmp_path / "models/model.pt")["format"] == "onecycle-model/1"
    # a failure after the model was logged redoes only what is missing
    (tmp_path / "checkpoints/finalize.json").write_text(json.dumps(
        {"run_id": run_id, "done": {k: None for k in ("outputs", "metrics", "checkpoints", "reports", "network")}}))
    _client(tmp_path).update_run(run_id, status="KILLED")
    seen.clear()
    assert _train(params, ws, step_fn=_no_training, finalize_hook=seen.append) == 0
    assert seen == ["end_run"] and sorted(m.name for m in _logged_models(tmp_path, run_id)) == [
        "checkpoint-best", "network"]


def test_one_cycle_schedules_that_do_not_fit_are_refused_and_the_others_run():
    from onecycle.config import ScheduleConfig
    from onecycle.core.errors import ConfigError
    from onecycle.training.schedule import build_scheduler

    refused = 0
    for cfg in (ScheduleConfig(), ScheduleConfig(pct_start=0.5), ScheduleConfig(three_phase=True),
                ScheduleConfig(peak_epoch=1), ScheduleConfig(pct_start=0.1, three_phase=True)):
        for epochs in (1, 2, 3):
            for steps in (1, 2, 3, 4, 5, 8):
                p = torch.nn.Parameter(torch.zeros(1))
                opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
                try:
                    sched = build_scheduler(opt, cfg, 0.4, epochs, steps)
                except ConfigError as exc:
                    assert "train.epochs" in str(exc) and "\n" not in str(exc)
                    refused += 1
                    continue
                for _ in range(epochs * steps):  # every accepted schedule steps to its end with finite LRs
                    opt.step()
                    sched.step()
                    assert np.isfinite(opt.param_groups[0]["lr"])
    assert refused > 0


def test_a_one_epoch_run_of_four_steps_is_refused_in_one_line_before_any_run(tmp_path, monkeypatch, capsys):
    from onecycle.stages.train import main

    write_fetched(tmp_path / "data", n_train=384, n_test=50)  # 256 train images, batch 64: 4 steps
    monkeypatch.chdir(tmp_path)
    tiny_params(tmp_path, train={"epochs": 1})
    assert main(["--params", "params.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.epochs 1 x 4 steps" in err[0] and "schedule.pct_start" in err[0]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_changed_dataset_starts_fresh_in_one_line_instead_of_crashing(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="onecycle")  # starting fresh is a note
    params, ws = _tiny_train(tmp_path, monkeypatch, epochs=3)
    assert _train(params, ws, step_fn=_step_failing_at(12, KeyboardInterrupt())) == 130  # in epoch 2
    first = ckpt.load(tmp_path / "checkpoints/last.pt")
    assert first["epoch"] == 1
    write_fetched(tmp_path / "data", n_train=900, n_test=100)  # new images: 772 train, 13 steps an epoch
    assert _train(params, ws) == 0
    assert "cannot continue here: train_images 472 -> 772, steps_per_epoch 8 -> 13" in caplog.text
    state = ckpt.load(tmp_path / "checkpoints/last.pt")
    assert state["mlflow_run_id"] != first["mlflow_run_id"] and state["global_step"] == 39
    kept = ckpt.load(tmp_path / "checkpoints/previous" / first["config_hash"] / "last.pt")
    assert kept["mlflow_run_id"] == first["mlflow_run_id"]


def test_a_checkpoint_of_another_architecture_device_or_precision_is_not_resumed(tmp_path, caplog):
    from onecycle.config import parse_params
    from onecycle.training.resume import find_resume_state

    caplog.set_level("INFO", logger="onecycle")  # starting fresh is a note
    params = parse_params({"train": {"device": "cpu"}})
    identity = {"architecture": "a1", "train_images": 100, "steps_per_epoch": 2, "device": "cpu",
                "precision": "None", "processes": 1}
    for key, old in (("architecture", "b2"), ("device", "cuda"), ("precision", "bfloat16"), ("processes", 2)):
        ckpt.save({"config_hash": "h", "epoch": 1, "identity": {**identity, key: old}}, tmp_path / "last.pt")
        assert find_resume_state(params.train, "h", tmp_path, identity=identity) is None
        assert f"cannot continue here: {key} {old} -> {identity[key]}" in caplog.text
        assert not (tmp_path / "last.pt").exists()
    assert len(list((tmp_path / "previous").glob("h*/last.pt"))) == 4  # every earlier one kept


def test_a_best_checkpoint_of_another_configuration_is_not_used(tmp_path, caplog):
    from onecycle.config import parse_params
    from onecycle.training.resume import find_resume_state

    caplog.set_level("INFO", logger="onecycle")  # starting fresh is a note
    params = parse_params({"train": {"device": "cpu"}})
    ckpt.save({"config_hash": "mine", "epoch": 1, "mlflow_run_id": None}, tmp_path / "last.pt")
    ckpt.save({"config_hash": "other", "model": {"w": torch.zeros(1)}, "epoch": 1}, tmp_path / "best.pt")
    assert find_resume_state(params.train, "mine", tmp_path) is None
    assert "best.pt is from a different configuration (hash other, now mine)" in caplog.text
    assert (tmp_path / "previous/mine/best.pt").is_file()


def test_a_second_train_in_the_same_workspace_fails_fast(tmp_path, monkeypatch, capsys):
    from filelock import FileLock

    from onecycle.stages.train import main

    write_fetched(tmp_path / "data", n_train=600, n_test=100)
    monkeypatch.chdir(tmp_path)
    tiny_params(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "l = FileLock('checkpoints/.train.lock'); l.acquire(); print('held', flush=True); "
                               "sys.stdin.read()"], cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["--params", "params.yaml"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another `onecycle train` is running in" in err[0]
        assert not (tmp_path / "mlflow.db").exists()
    finally:
        holder.communicate("", timeout=30)
    assert FileLock(str(tmp_path / "checkpoints/.train.lock"), timeout=0).acquire()  # released by its holder


@pytest.mark.slow
def test_a_queued_dvc_experiment_says_it_cannot_be_resumed(tmp_path, monkeypatch, capsys):
    params, ws = _tiny_train(tmp_path / "exp", monkeypatch)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "workspace"))  # DVC runs us in a temporary copy

    calls = []

    def sigint_at_step_3(*args, **kwargs):
        from onecycle.training.engine import train_step

        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(*args, **kwargs)

    from onecycle.core.paths import Workspace

    assert _train(params, Workspace(Path(".")), step_fn=sigint_at_step_3) == 130
    err = capsys.readouterr().err
    assert "temporary copy that DVC deletes" in err and "cannot be resumed" in err
    assert "again to resume" not in err


@pytest.mark.slow
def test_epochs_lost_before_reaching_mlflow_are_logged_on_resume(tmp_path, monkeypatch):
    import mlflow

    params, ws = _tiny_train(tmp_path, monkeypatch, epochs=3)
    real = mlflow.MlflowClient.log_batch

    calls = []

    def down_after_epoch_1(self, run_id, metrics=(), *args, **kwargs):
        calls.append(bool(metrics))
        if metrics and sum(calls) > 1:
            raise mlflow.exceptions.MlflowException("connection refused")
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", down_after_epoch_1)
    assert _train(params, ws, step_fn=_step_failing_at(17, KeyboardInterrupt())) == 130  # epoch 3's first step
    assert ckpt.load(tmp_path / "checkpoints/last.pt")["epoch"] == 2
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", real)
    assert _train(params, ws) == 0
    run_id = json.loads((tmp_path / "reports/runs.json").read_text())["train"]
    client = _client(tmp_path)
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/top1")) == [1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(run_id, "lr")) == list(range(24))


@pytest.mark.slow
def test_mlflow_failing_to_end_the_run_after_a_crash_is_not_a_traceback(tmp_path, monkeypatch, capsys):
    import mlflow

    params, ws = _tiny_train(tmp_path, monkeypatch)

    def store_down(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("connection refused")

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", store_down)
    assert _train(params, ws, step_fn=_step_failing_at(3, KeyboardInterrupt())) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "onecycle train: interrupted"


@pytest.mark.slow
def test_a_resume_after_the_run_was_deleted_or_the_experiment_changed(tmp_path, monkeypatch, caplog):
    params, ws = _tiny_train(tmp_path, monkeypatch, epochs=3)
    assert _train(params, ws, step_fn=_step_failing_at(10, KeyboardInterrupt())) == 130
    first = ckpt.load(tmp_path / "checkpoints/last.pt")["mlflow_run_id"]
    # the experiment renamed in params: the run continues in its own experiment
    other = params.replace(mlflow={"experiment": "renamed"})
    assert _train(other, ws, step_fn=_step_failing_at(4, KeyboardInterrupt())) == 130
    assert "it continues there" in caplog.text
    assert ckpt.load(tmp_path / "checkpoints/last.pt")["mlflow_run_id"] == first
    # the run deleted in the UI: training continues from the checkpoint in a new run, with every epoch
    client = _client(tmp_path)
    client.delete_run(first)
    assert _train(params, ws) == 0
    run_id = json.loads((tmp_path / "reports/runs.json").read_text())["train"]
    assert run_id != first and "was deleted" in caplog.text
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/top1")) == [1, 2, 3]
    # the experiment deleted in the UI: restored, and the next training runs in it
    client.delete_experiment(client.get_experiment_by_name("test").experiment_id)
    assert _train(params, ws) == 0
    assert "had been deleted: restored it" in caplog.text
    assert client.get_experiment_by_name("test").lifecycle_stage == "active"


@pytest.mark.slow
def test_evaluate_leaves_a_diverged_training_run_failed(tmp_path, monkeypatch):
    from onecycle.core.paths import Workspace
    from onecycle.stages import evaluate
    from onecycle.training import engine

    params, ws = _tiny_train(tmp_path, monkeypatch, epochs=3)

    calls = []

    def nan_in_epoch_2(*args, **kwargs):
        calls.append(1)
        loss, logits = engine.train_step(*args, **kwargs)
        return (loss * float("nan") if len(calls) > 10 else loss), logits

    assert _train(params, ws, step_fn=nan_in_epoch_2) == 1
    run_id = json.loads((tmp_path / "reports/runs.json").read_text())["train"]
    evaluate.run(params, Workspace(tmp_path))
    run = _client(tmp_path).get_run(run_id)
    assert run.info.status == "FAILED" and "test_top1" in run.data.metrics


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
    from onecycle.core.redact import redact

    assert redact(text) == masked
    assert redact({"a": [text], "b": 3}) == {"a": [masked], "b": 3}


@pytest.mark.slow
def test_a_storage_password_never_reaches_mlflow_logs_or_reports(tmp_path, monkeypatch, capsys, caplog):
    """tune.storage with a password: train logs all params to MLflow; the password must not be among them."""
    import logging

    from onecycle.stages import train as train_mod

    write_fetched(tmp_path / "data", n_train=600, n_test=50)  # 8 steps: a schedule that fits (3 would not)
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


@pytest.mark.slow
def test_a_network_left_pending_by_a_kill_during_logging_is_replaced_not_duplicated(tmp_path, monkeypatch):
    """kill -9 while the network uploads leaves a PENDING logged model and no record of the step: the rerun completes
    the run with one READY network; killed after the upload but before the record, the rerun logs none again."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    params, ws = _tiny_train(tmp_path, monkeypatch)
    assert _train(params, ws) == 0
    run_id = ckpt.load(tmp_path / "checkpoints/last.pt")["mlflow_run_id"]
    record = json.loads((tmp_path / "checkpoints/finalize.json").read_text())
    undone = {"run_id": run_id, "done": {k: v for k, v in record["done"].items() if k not in ("network", "end_run")}}
    client = _client(tmp_path)
    (ready,) = [m.model_id for m in _logged_models(tmp_path, run_id) if m.name == "network"]
    for case in ("killed during the upload", "killed after it"):
        if case == "killed during the upload":
            client.delete_logged_model(ready)
            mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
            mlflow.initialize_logged_model(name="network", source_run_id=run_id)  # PENDING, as the kill left it
        (tmp_path / "checkpoints/finalize.json").write_text(json.dumps(undone))
        client.update_run(run_id, status="RUNNING")
        assert _train(params, ws, step_fn=_no_training) == 0, case
        networks = [m for m in _logged_models(tmp_path, run_id) if m.name == "network"]
        assert [m.status for m in networks] == [LoggedModelStatus.READY], case
        assert client.get_run(run_id).info.status == "FINISHED"
