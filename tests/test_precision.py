"""``train.amp: auto`` picks the precision that fits the machine, says why, and changes nothing where fp32 fits.

The machine's capabilities are injected (``choose_precision``'s ``amx``/``cuda_bf16`` arguments, or the
``cpu_has_amx`` probe monkeypatched), so every case is checked on any machine.
"""

from __future__ import annotations

import json

import pytest
import torch

from onecycle.config import load_params, parse_params
from onecycle.training import engine
from onecycle.training.engine import build_setup, choose_precision, train_step
from onecycle.training.loop import FitHooks, Interrupted
from tiny import fit_tiny, tiny_params

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.mark.parametrize(("amp", "device", "on_cpu", "caps", "dtype", "why"), [
    ("auto", CPU, False, {"amx": True}, torch.bfloat16, "bf16 (auto: CPU with AMX)"),
    ("auto", CPU, True, {"amx": False}, None, "fp32 (auto: CPU without AMX)"),
    ("auto", CUDA, False, {"cuda_bf16": True}, torch.bfloat16, "bf16 (auto: CUDA with bf16)"),
    ("auto", CUDA, False, {"cuda_bf16": False}, torch.float16, "fp16 (auto: CUDA without bf16, with GradScaler)"),
    ("auto", MPS, False, {"amx": True, "cuda_bf16": True}, None, "fp32 (auto: mps, no mixed precision there)"),
    # the settings before auto keep their meaning
    (False, CUDA, False, {"cuda_bf16": True}, None, "fp32 (train.amp false)"),
    (False, CPU, True, {"amx": True}, None, "fp32 (train.amp false)"),
    (True, CUDA, False, {}, torch.float16, "fp16 (train.amp True)"),
    ("bf16", CPU, False, {"amx": True}, None, "fp32 (train.amp bf16 ignored: train.amp_on_cpu is false)"),
    ("bf16", CPU, True, {"amx": False}, torch.bfloat16, "bf16 (train.amp bf16)"),
    ("fp16", CPU, True, {}, torch.float16, "fp16 (train.amp fp16)"),
    ("fp16", MPS, True, {}, None, "fp32 (train.amp fp16 ignored: no mixed precision on mps)"),
], ids=["cpu-amx", "cpu-no-amx", "cuda-bf16", "cuda-fp16", "mps", "off-cuda", "off-cpu", "true-cuda",
        "bf16-cpu-not-allowed", "bf16-cpu-allowed", "fp16-cpu-allowed", "fp16-mps"])
def test_amp_resolves_per_machine_and_says_why(amp, device, on_cpu, caps, dtype, why):
    assert choose_precision(amp, device, on_cpu, **caps) == (dtype, why)


def test_auto_is_the_default_and_the_cpu_probe_decides_it(workdir, monkeypatch):
    assert parse_params({}).train.amp == "auto"
    params = load_params(tiny_params(workdir))
    for amx, dtype, why in ((True, torch.bfloat16, "bf16 (auto: CPU with AMX)"),
                            (False, None, "fp32 (auto: CPU without AMX)")):
        monkeypatch.setattr(engine, "cpu_has_amx", lambda amx=amx: amx)
        setup = build_setup(params.data, params.augment, params.model, params.train, root=workdir)
        assert (setup.dtype, setup.precision) == (dtype, why)
        assert engine.amp_dtype(params.train.amp, setup.device) == dtype  # what evaluate uses


@pytest.mark.slow
def test_auto_on_a_cpu_without_amx_trains_bit_for_bit_as_fp32(workdir, monkeypatch):
    monkeypatch.setattr(engine, "cpu_has_amx", lambda: False)
    old, _ = fit_tiny(workdir, amp=False)
    auto, setup = fit_tiny(workdir, amp="auto")
    assert setup.dtype is None
    assert [r["val_loss"] for r in auto.history] == [r["val_loss"] for r in old.history]
    for k, v in old.best_state.items():
        assert torch.equal(v, auto.best_state[k]), k


@pytest.mark.slow
def test_bf16_on_cpu_trains_checkpoints_and_resumes_bit_for_bit(workdir):
    bf16 = {"amp": "bf16", "amp_on_cpu": True, "check_every": 4}
    straight, setup = fit_tiny(workdir, **bf16)
    assert setup.dtype == torch.bfloat16 and setup.precision == "bf16 (train.amp bf16)"
    steps = {"n": 0}

    def counting(*args, **kwargs):
        steps["n"] += 1
        loss, logits = train_step(*args, **kwargs)
        assert logits.dtype == torch.bfloat16  # autocast really ran
        return loss, logits

    saved = []
    with pytest.raises(Interrupted):  # stopped in epoch 2, after a full epoch was checkpointed
        fit_tiny(workdir, hooks=FitHooks(save_last=saved.append), should_stop=lambda: steps["n"] >= 10,
             step_fn=counting, **bf16)
    assert saved[-1]["partial"]["step_in_epoch"] == 4
    resumed, _ = fit_tiny(workdir, resume_state=saved[-1], **bf16)
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in straight.history]
    for k, v in straight.best_state.items():
        assert torch.equal(v, resumed.best_state[k]), k


@pytest.mark.slow
def test_the_train_stage_says_which_precision_and_why(workdir, capsys, monkeypatch):
    import mlflow

    from onecycle.stages.train import main

    monkeypatch.setattr(engine, "cpu_has_amx", lambda: False)
    tiny_params(workdir, train={"epochs": 1})
    assert main(["--params", "params.yaml"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("train: ") and "fp32 (auto: CPU without AMX); MLflow run " in first
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    run = mlflow.MlflowClient().get_run(json.loads((workdir / "reports/runs.json").read_text())["train"])
    assert run.data.tags["precision"] == "fp32 (auto: CPU without AMX)"
