"""Issue #28: the tracking store interrupted, busy, down or broken, a full disk, and tune workers killed."""

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
    assert "candidate" not in client.get_registered_model(MODEL).aliases
    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", real)
    assert _evaluate(params, ws) == 0
    client = _client(tmp_path)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test_top1" in run.data.metrics
    assert str(client.get_registered_model(MODEL).aliases.get("candidate")) == "1"
    assert {f.path for f in client.list_artifacts(run_id, "evaluate")} >= {"evaluate/metrics.json",
                                                                           "evaluate/per_class.json"}


@pytest.mark.slow
def test_evaluate_repairs_a_finished_training_run_an_older_interrupted_evaluate_left_failed(tmp_path, monkeypatch):
    params, ws, run_id = _trained(tmp_path, monkeypatch)
    client = _client(tmp_path)
    client.set_terminated(run_id, "FAILED")  # what Ctrl-C in an older evaluate left (kill -9: RUNNING)
    assert _evaluate(params, ws) == 0
    client = _client(tmp_path)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert str(client.get_registered_model(MODEL).aliases.get("candidate")) == "1"
