"""``train.amp: auto`` picks the precision that fits the machine, says why, and changes nothing where fp32 fits.

The machine's capabilities are injected (``choose_precision``'s ``cpu_bf16_kind``/``cuda_bf16`` arguments, or the
``cpu_bf16`` probe monkeypatched), so every case is checked on any machine.
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
    ("auto", CPU, False, {"cpu_bf16_kind": "AMX"}, torch.bfloat16, "bf16 (auto: CPU with AMX)"),
    ("auto", CPU, False, {"cpu_bf16_kind": "AVX512-BF16"}, torch.bfloat16, "bf16 (auto: CPU with AVX512-BF16)"),
    ("auto", CPU, True, {"cpu_bf16_kind": None}, None, "fp32 (auto: CPU without native bf16)"),
    ("auto", CUDA, False, {"cuda_bf16": True}, torch.bfloat16, "bf16 (auto: CUDA with bf16)"),
    ("auto", CUDA, False, {"cuda_bf16": False}, torch.float16, "fp16 (auto: CUDA without bf16, with GradScaler)"),
    ("auto", MPS, False, {"cpu_bf16_kind": "AMX", "cuda_bf16": True}, None, "fp32 (auto: mps, no mixed precision there)"),
    # the settings before auto keep their meaning
    (False, CUDA, False, {"cuda_bf16": True}, None, "fp32 (train.amp false)"),
    (False, CPU, True, {"cpu_bf16_kind": "AMX"}, None, "fp32 (train.amp false)"),
    (True, CUDA, False, {}, torch.float16, "fp16 (train.amp True)"),
    ("bf16", CPU, False, {"cpu_bf16_kind": "AMX"}, None, "fp32 (train.amp bf16 ignored: train.amp_on_cpu is false)"),
    ("bf16", CPU, True, {"cpu_bf16_kind": None}, torch.bfloat16, "bf16 (train.amp bf16)"),
    ("fp16", CPU, True, {}, torch.float16, "fp16 (train.amp fp16)"),
    ("fp16", MPS, True, {}, None, "fp32 (train.amp fp16 ignored: no mixed precision on mps)"),
], ids=["cpu-amx", "cpu-avx512-bf16", "cpu-no-native-bf16", "cuda-bf16", "cuda-fp16", "mps", "off-cuda", "off-cpu", "true-cuda",
        "bf16-cpu-not-allowed", "bf16-cpu-allowed", "fp16-cpu-allowed", "fp16-mps"])
def test_amp_resolves_per_machine_and_says_why(amp, device, on_cpu, caps, dtype, why):
    assert choose_precision(amp, device, on_cpu, **caps) == (dtype, why)


def test_auto_is_the_default_and_the_cpu_probe_decides_it(workdir, monkeypatch):
    assert parse_params({}).train.amp == "auto"
    params = load_params(tiny_params(workdir))
    for kind, dtype, why in (("AMX", torch.bfloat16, "bf16 (auto: CPU with AMX)"),
                             ("AVX512-BF16", torch.bfloat16, "bf16 (auto: CPU with AVX512-BF16)"),
                             (None, None, "fp32 (auto: CPU without native bf16)")):
        monkeypatch.setattr(engine, "cpu_bf16", lambda kind=kind: kind)
        setup = build_setup(params.data, params.augment, params.model, params.train, root=workdir)
        assert (setup.dtype, setup.precision) == (dtype, why)


@pytest.mark.slow
def test_auto_on_a_cpu_without_native_bf16_trains_bit_for_bit_as_fp32(workdir, monkeypatch):
    monkeypatch.setattr(engine, "cpu_bf16", lambda: None)
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

    monkeypatch.setattr(engine, "cpu_bf16", lambda: None)
    tiny_params(workdir, train={"epochs": 1})
    assert main(["--params", "params.yaml"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("train: ") and "fp32 (auto: CPU without native bf16); MLflow run " in first
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    run = mlflow.MlflowClient().get_run(json.loads((workdir / "reports/runs.json").read_text())["train"])
    assert run.data.tags["precision"] == "fp32 (auto: CPU without native bf16)"


@pytest.mark.parametrize(("caps", "kind"), [
    ({"amx_bf16": True, "amx_tile": True, "avx512_bf16": True}, "AMX"),
    ({"amx_bf16": False, "amx_tile": False, "avx512_bf16": True}, "AVX512-BF16"),  # AMD Zen 4+, Intel Cooper Lake
    ({"amx_bf16": False, "amx_tile": False, "avx512_bf16": False, "avx512_f": True}, None),
    ({"avx2": True}, None),
], ids=["amx", "avx512-bf16", "avx512-without-bf16", "avx2"])
def test_the_cpu_probe_reads_torchs_cpuinfo(monkeypatch, caps, kind):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert engine.cpu_bf16() == kind


@pytest.mark.slow
def test_evaluate_scores_a_bf16_trained_model_in_fp32_as_predict_and_serving_do(workdir):
    """The test metrics of a model trained with bf16 autocast are its fp32 scores (what predict and the served
    model answer), not a bf16 pass's."""
    from onecycle.data.loaders import build_split, make_loader
    from onecycle.data.store import load_info
    from onecycle.serving.modelfile import load_model_bundle
    from onecycle.stages import evaluate, train
    from onecycle.training.engine import evaluate as score

    params = load_params(tiny_params(workdir, train={"epochs": 1, "amp": "bf16", "amp_on_cpu": True}))
    assert train.main(["--params", "params.yaml"]) == 0
    assert evaluate.main(["--params", "params.yaml"]) == 0
    metrics = json.loads((workdir / "reports/metrics.json").read_text())["test"]
    model, _, _ = load_model_bundle(workdir / "models/model.pt")
    test = make_loader(build_split(params.data, params.augment, load_info(params.data, workdir), "test",
                                   train_augment=False, seed=params.train.seed), 64, shuffle=False, seed=0, num_workers=0)
    fp32 = score(model, test, CPU, None, tta=params.evaluate.tta)
    bf16 = score(model, test, CPU, torch.bfloat16, tta=params.evaluate.tta)
    assert fp32["loss"] != bf16["loss"]  # the two precisions are told apart on these images
    assert metrics["loss"] == pytest.approx(fp32["loss"], rel=1e-6) and metrics["top1"] == fp32["top1"]
