"""The One Cycle schedule's numeric contract, and the trainer: MLflow run, checkpoints, resume, divergence."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from onecycle.config import ScheduleConfig, parse_params
from onecycle.core.errors import ConfigError
from onecycle.training import checkpoint as ckpt
from onecycle.training.schedule import build_scheduler, current_momentum
from tiny import tiny_params, write_fetched


def _run_schedule(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int, max_lr: float = 0.4, opt: str = "sgd"):
    """The (lr, momentum) each optimizer step runs with, stepping the scheduler once per step."""
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=0.1, momentum=0.9) if opt == "sgd" else torch.optim.Adam([p], lr=0.1)
    sched = build_scheduler(optimizer, cfg, max_lr, epochs, steps_per_epoch)
    seen = []
    for _ in range(epochs * steps_per_epoch):
        seen.append((optimizer.param_groups[0]["lr"], current_momentum(optimizer)))
        optimizer.step()
        sched.step()
    return np.array(seen)


def test_one_cycle_peaks_at_pct_start_and_ends_at_the_final_lr():
    cfg = ScheduleConfig(pct_start=0.25, div_factor=25, final_div_factor=1e4)
    seen = _run_schedule(cfg, epochs=4, steps_per_epoch=10, max_lr=0.4)
    lrs, moms = seen[:, 0], seen[:, 1]
    assert lrs[0] == pytest.approx(0.4 / 25, rel=1e-12)
    assert int(np.argmax(lrs)) == 9  # pct_start * total_steps - 1
    assert lrs[9] == pytest.approx(0.4, rel=1e-12)
    assert lrs[-1] == pytest.approx(0.4 / 25 / 1e4, rel=1e-9)
    # momentum cycles inversely: max at the start and end, base at the peak LR
    assert moms[0] == pytest.approx(0.95) and moms[9] == pytest.approx(0.85) and moms[-1] == pytest.approx(0.95)


def test_peak_epoch_and_no_annihilation_match_the_cifar_recipe():
    # DAWNBench: peak at epoch 5 of 24, linear, ending where it started (final_div_factor 1).
    cfg = ScheduleConfig(peak_epoch=5, anneal_strategy="linear", div_factor=10, final_div_factor=1)
    seen = _run_schedule(cfg, epochs=24, steps_per_epoch=3, max_lr=0.4)
    lrs = seen[:, 0]
    assert int(np.argmax(lrs)) == 5 * 3 - 1
    assert lrs[-1] == pytest.approx(0.04, rel=1e-9) == lrs[0]
    # linear warm-up: constant increments
    np.testing.assert_allclose(np.diff(lrs[:15]), (0.4 - 0.04) / 14, rtol=1e-9)


def test_three_phase_ends_at_the_final_lr():
    cfg = ScheduleConfig(pct_start=0.3, three_phase=True, div_factor=20, final_div_factor=100)
    lrs = _run_schedule(cfg, epochs=2, steps_per_epoch=50, max_lr=1.0)[:, 0]
    assert int(np.argmax(lrs)) == 29
    assert lrs[58] == pytest.approx(1.0 / 20, rel=1e-9)  # back to the initial LR: torch ends phase 2 at 2 pct T - 2
    assert lrs[-1] == pytest.approx(1.0 / 20 / 100, rel=1e-9)


def test_adam_cycles_beta1():
    seen = _run_schedule(ScheduleConfig(pct_start=0.5), epochs=1, steps_per_epoch=10, opt="adam")
    assert seen[0, 1] == pytest.approx(0.95) and seen[4, 1] == pytest.approx(0.85)


def test_scheduler_state_dict_round_trip_continues_exactly():
    cfg = ScheduleConfig()
    full = _run_schedule(cfg, epochs=3, steps_per_epoch=7)[:, 0]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sched = build_scheduler(opt, cfg, 0.4, 3, 7)
    for _ in range(8):
        opt.step()
        sched.step()
    state_opt, state_sched = opt.state_dict(), sched.state_dict()
    opt2 = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sched2 = build_scheduler(opt2, cfg, 0.4, 3, 7)
    opt2.load_state_dict(state_opt)
    sched2.load_state_dict(state_sched)
    rest = []
    for _ in range(21 - 8):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    np.testing.assert_array_equal(np.array(rest), full[8:])


def test_peak_epoch_must_lie_inside_training():
    with pytest.raises(ConfigError, match=r"^schedule\.peak_epoch must be below train\.epochs \(4\), got 4"):
        parse_params({"schedule": {"peak_epoch": 4}, "train": {"epochs": 4}})


# ------------------------------------------------------------------------------------------- the stage

def _client(workdir):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    return mlflow.MlflowClient()


def _history(workdir):
    with open(workdir / "reports/history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_train_logs_a_complete_mlflow_run_and_a_usable_model(workdir):
    import mlflow

    from onecycle.stages.train import main

    tiny_params(workdir, mlflow={"registered_model": "tiny-resnet", "log_checkpoints": "best"})
    assert main(["--params", "params.yaml"]) == 0
    summary = json.loads((workdir / "reports/train.json").read_text())
    client = _client(workdir)
    run = client.get_run(json.loads((workdir / "reports/runs.json").read_text())["train"])
    assert run.info.status == "FINISHED"
    assert run.data.params["schedule.pct_start"] == "0.25"
    assert run.data.params["model.name"] == "resnet9"
    for tag in ("git_commit", "git_dirty", "device", "torch_version", "dataset"):
        assert tag in run.data.tags
    assert run.data.tags["dataset"] == "fashion_mnist"
    # one point per epoch, one lr point per optimizer step (472 train images / 64 = 8 steps per epoch)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [1, 2]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "lr")) == list(range(16))
    # the synthetic task is easy: two epochs must beat chance (10%) clearly
    assert summary["best_val_top1"] > 0.3
    # the best checkpoint is an MLflow 3 logged model of the run at its epoch (the run's Logged models tab), with
    # that epoch's metrics linked to it and to their datasets; it is no longer a plain artifact of the run
    assert not client.list_artifacts(run.info.run_id, "checkpoints")
    found = client.search_logged_models([run.info.experiment_id], filter_string=(
        f"source_run_id = '{run.info.run_id}' AND model_type = 'checkpoint'"))
    assert [(m.name, m.tags["epoch"]) for m in found] == [("checkpoint-best", str(summary["best_epoch"]))]
    checkpoint = found[0]
    assert (checkpoint.model_id, summary["best_epoch"]) in {(o.model_id, o.step) for o in run.outputs.model_outputs}
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    linked = {m.key: m for m in checkpoint.metrics}
    assert linked["val/top1"].value == pytest.approx(summary["best_val_top1"])
    assert (linked["val/top1"].dataset_name, linked["val/top1"].step) == ("fashion_mnist-val", summary["best_epoch"])
    assert linked["val/top1"].dataset_digest == digests["fashion_mnist-val"]
    assert linked["train/loss"].dataset_name == "fashion_mnist-train"
    assert linked["wall_clock/epoch_seconds"].dataset_name is None
    assert all(m.model_id == checkpoint.model_id for m in checkpoint.metrics)
    local = mlflow.artifacts.download_artifacts(f"{checkpoint.artifact_location}/best.pt")
    assert ckpt.load(local)["epoch"] == summary["best_epoch"]
    assert any(a.path == "model_summary.txt" for a in client.list_artifacts(run.info.run_id))
    # train logs the raw network (tensors in); the registered image classifier is made after evaluate, by publish
    assert client.search_model_versions("name='tiny-resnet'") == []
    logged = [m for m in (client.get_logged_model(o.model_id) for o in run.outputs.model_outputs)
              if m.name != "checkpoint-best"]  # the checkpoint as a logged model: checked above
    assert [m.name for m in logged] == ["network"] and logged[0].source_run_id == run.info.run_id
    model = mlflow.pytorch.load_model(f"models:/{logged[0].model_id}")
    x = torch.randn(3, 1, 28, 28)
    probs = model(x).detach()
    assert probs.shape == (3, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    # models/model.pt loads without running code and holds what rebuilds the model
    bundle = ckpt.load(workdir / "models/model.pt")
    assert bundle["dataset"]["classes"][0] == "class0" and bundle["model"]["width"] == 0.125
    rows = _history(workdir)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # reports/schedule.csv (the "Learning rate" and "Momentum" DVC plots): every step, the warm-up visible
    steps = list(csv.DictReader(open(workdir / "reports/schedule.csv")))
    lrs = [float(r["lr"]) for r in steps]
    assert [int(r["step"]) for r in steps] == list(range(16))
    assert lrs[0] == pytest.approx(0.05 / 25)  # max_lr / div_factor
    assert max(lrs) == pytest.approx(0.05) and lrs.index(max(lrs)) == 0.25 * 16 - 1  # peak at pct_start
    assert lrs[-1] == pytest.approx(0.05 / 25 / 1e4) and float(steps[3]["momentum"]) == pytest.approx(0.85)
    assert "mlflow_run_id" not in summary


def test_a_long_schedule_is_downsampled_keeping_the_first_peak_and_last_step():
    from onecycle.training.records import Step, downsample_steps, schedule_csv

    steps = [Step(i, 1.0 - abs(i - 4321) / 10_000, 0.9) for i in range(10_001)]  # peak at step 4321
    kept = downsample_steps(steps, limit=2000)
    assert len(kept) <= 2002 and [s for s, _, _ in kept] == sorted({s for s, _, _ in kept})
    assert {0, 4321, 10_000} <= {s for s, _, _ in kept}
    assert {b[0] - a[0] for a, b in zip(kept, kept[1:], strict=False)} <= {1, 2, 3, 4, 5, 6}  # evenly spread
    assert downsample_steps(steps[:2000]) == steps[:2000]
    rows = list(csv.reader(schedule_csv(steps[:2]).splitlines()))
    assert rows[0] == ["step", "lr", "momentum"] and [(int(s), float(lr), float(m)) for s, lr, m in rows[1:]] == steps[:2]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["one_cycle", "step"])
def test_resume_equals_an_uninterrupted_run(tmp_path, policy):
    from onecycle.config import load_params
    from onecycle.core.paths import Workspace
    from onecycle.stages import train
    from onecycle.stages.command import guarded
    from onecycle.training.engine import train_step

    results = {}
    for name in ("straight", "interrupted"):
        work = tmp_path / name
        write_fetched(work / "data", n_train=600, n_test=100)
        tiny_params(work, train={"epochs": 3}, schedule={"policy": policy})
        params, ws = load_params(work / "params.yaml"), Workspace(work)
        if name == "interrupted":
            calls = {"n": 0}

            def crash_in_epoch_3(*args, calls=calls, **kwargs):  # 8 steps per epoch: the first step of epoch 3
                calls["n"] += 1
                if calls["n"] == 17:
                    raise KeyboardInterrupt
                return train_step(*args, **kwargs)

            assert guarded("train", lambda p=params, w=ws, f=crash_in_epoch_3: train.run(p, w, step_fn=f)) == 130
            first = ckpt.load(work / "checkpoints/last.pt")
            assert first["epoch"] == 2
            assert len(_history(work)) == 2
        assert guarded("train", lambda p=params, w=ws: train.run(p, w)) == 0
        run_id = json.loads((work / "reports/runs.json").read_text())["train"]
        if name == "interrupted":
            assert run_id == first["mlflow_run_id"]  # the same MLflow run continued
        client = _client(work)
        results[name] = {
            "model": ckpt.load(work / "models/model.pt")["state_dict"],
            "history": [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_second")}
                        for r in _history(work)],
            "val_steps": sorted(m.step for m in client.get_metric_history(run_id, "val/top1")),
            "lr_steps": sorted(m.step for m in client.get_metric_history(run_id, "lr")),
            "runs": len(client.search_runs([client.get_experiment_by_name("test").experiment_id])),
            "schedule": (work / "reports/schedule.csv").read_text(),
        }
    a, b = results["straight"], results["interrupted"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"] == b["history"]
    assert b["val_steps"] == [1, 2, 3]  # no duplicated or missing epoch rows
    assert b["lr_steps"] == a["lr_steps"] == list(range(24))
    assert b["runs"] == 1
    assert b["schedule"] == a["schedule"]  # every step's LR, the ones before the interruption included
    assert [int(line.split(",")[0]) for line in a["schedule"].splitlines()[1:]] == list(range(24))
    lrs = [float(line.split(",")[1]) for line in a["schedule"].splitlines()[1:]]
    if policy == "step":  # the policy trained is the one in reports/schedule.csv: /10 at steps 12 and 18 of 24
        assert lrs[:12] == [0.05] * 12 and lrs[12:18] == pytest.approx([0.005] * 6) and lrs[18:] == pytest.approx([0.0005] * 6)
    else:
        assert max(lrs) == pytest.approx(0.05) and lrs.index(max(lrs)) == 5  # pct_start 0.25 of 24 steps, less one


@pytest.mark.slow
def test_a_changed_configuration_starts_fresh_and_keeps_the_old_checkpoint(workdir, caplog):
    from onecycle.stages.train import main

    caplog.set_level("INFO", logger="onecycle")  # starting fresh is a note
    tiny_params(workdir, train={"epochs": 1})
    assert main(["--params", "params.yaml"]) == 0
    first = json.loads((workdir / "reports/runs.json").read_text())["train"]
    first_hash = ckpt.load(workdir / "checkpoints/last.pt")["config_hash"]
    tiny_params(workdir, train={"epochs": 1}, schedule={"max_lr": 0.02})
    assert main(["--params", "params.yaml"]) == 0
    second = json.loads((workdir / "reports/runs.json").read_text())["train"]
    assert second != first
    assert "new configuration" in caplog.text
    old = ckpt.load(workdir / "checkpoints/previous" / first_hash / "last.pt")
    assert old["mlflow_run_id"] == first
    tiny_params(workdir, train={"epochs": 1})  # back to the first: the second run's checkpoints move aside too
    assert main(["--params", "params.yaml"]) == 0
    assert ckpt.load(workdir / "checkpoints/previous" / first_hash / "last.pt")["mlflow_run_id"] == first  # kept
    kept = sorted(p.parent.name for p in (workdir / "checkpoints/previous").glob("*/last.pt"))
    assert len(kept) == 2 and first_hash in kept


@pytest.mark.slow
def test_nan_loss_stops_training_marks_the_run_failed_and_keeps_the_best_checkpoint(workdir, capsys):
    from onecycle.config import load_params
    from onecycle.core.paths import Workspace
    from onecycle.stages import train
    from onecycle.stages.command import guarded
    from onecycle.training import engine

    tiny_params(workdir, train={"epochs": 3})
    real_step = engine.train_step
    calls = {"n": 0}

    def nan_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        loss, logits = real_step(*args, **kwargs)
        return (loss * float("nan") if calls["n"] > 10 else loss), logits  # 8 steps per epoch

    params = load_params(workdir / "params.yaml")
    assert guarded("train", lambda: train.run(params, Workspace(workdir), step_fn=nan_in_epoch_2)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the training loss became nan at epoch 2, step 11" in err
    client = _client(workdir)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "nan" in runs[0].data.tags["failure_reason"]
    best = ckpt.load(workdir / "checkpoints/best.pt")
    assert best["epoch"] == 1
    assert ckpt.load(workdir / "models/model.pt")["format"] == "onecycle-model/1"


def test_max_lr_auto_without_lr_find_report_is_a_clear_error(workdir, capsys):
    from onecycle.stages.train import main

    tiny_params(workdir, schedule={"max_lr": "auto"})
    assert main(["--params", "params.yaml"]) == 1
    assert "run `onecycle lr-find`" in capsys.readouterr().err


def test_a_signal_to_train_requests_the_stop_and_ctrl_c_again_stops_at_once(caplog):
    """The first SIGTERM/SIGINT only requests the stop (fit honours it between two optimizer steps and writes a
    checkpoint); a SIGTERM again is the same request (a DDP worker gets a job's SIGTERM from the scheduler and
    through torchrun); Ctrl-C again raises KeyboardInterrupt at once; leaving the block raises nothing (a training
    whose last step has run finalizes) and puts the handlers back."""
    import os
    import signal

    from onecycle.training.loop import StopSignals

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert stop() is False
        stop.check()  # nothing requested: a safe point passes
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() is True  # requested, nothing raised: the step in progress goes on
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() is True  # the same request: the checkpoint is still written
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again: at once
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert caplog.text.count("SIGTERM received: stopping after this step and writing a checkpoint (Ctrl-C again "
                             "to abort)") == 1


def test_a_corrupt_checkpoint_is_reported_not_replaced(workdir, capsys):
    from onecycle.stages.train import main

    tiny_params(workdir)
    (workdir / "checkpoints").mkdir()
    (workdir / "checkpoints/last.pt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["--params", "params.yaml"]) == 1
    err = capsys.readouterr().err
    assert "checkpoints/last.pt is not a readable checkpoint" in err
    assert (workdir / "checkpoints/last.pt").read_bytes() == b"PK\x03\x04 truncated"
    assert not (workdir / "mlflow.db").exists()


def test_params_flat_names_are_dotted():
    names = parse_params({}).flat()
    assert names["schedule.max_lr"] == "auto" and names["optimizer.betas"] == [0.9, 0.999]
