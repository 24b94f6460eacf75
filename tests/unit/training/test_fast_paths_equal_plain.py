"""The speed paths behave exactly like the plain ones: on-device batches, sparse NaN/stop checks, mixed precision."""

from __future__ import annotations

import math

import pytest
import torch

from onecycle.config import load_params
from onecycle.data.loaders import set_epoch, skip_batches
from onecycle.training import checkpoint as ckpt
from onecycle.training.engine import DivergenceError, build_setup, train_step
from onecycle.training.loop import FitHooks, Interrupted
from tiny import fit_tiny, tiny_params


def _batches(loader, epoch: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    set_epoch(loader, epoch)
    skip_batches(loader, skip)
    try:
        return [(x.clone(), y.clone()) for x, y in loader]
    finally:
        skip_batches(loader, 0)


def test_on_device_batches_are_the_dataloader_batches_bit_for_bit(workdir):
    plain_p = load_params(tiny_params(workdir))
    device_p = load_params(tiny_params(workdir, data={"on_device": True}))
    plain = build_setup(plain_p.data, plain_p.augment, plain_p.model, plain_p.train, root=workdir)
    device = build_setup(device_p.data, device_p.augment, device_p.model, device_p.train, root=workdir)
    assert type(device.train_loader).__name__ == "DeviceLoader" and type(plain.train_loader).__name__ == "DataLoader"
    for loaders, skips in (((plain.train_loader, device.train_loader), (0, 0, 3)),  # a resumed epoch skips batches
                           ((plain.val_loader, device.val_loader), (0, 0, 0))):
        for epoch, skip in enumerate(skips):
            a, b = _batches(loaders[0], epoch, skip), _batches(loaders[1], epoch, skip)
            assert len(a) == len(b) == len(loaders[0]) - skip
            for (xa, ya), (xb, yb) in zip(a, b, strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # and the augmentation really differs between epochs (the test would pass trivially otherwise)
    assert not torch.equal(_batches(device.train_loader, 0)[0][0], _batches(device.train_loader, 1)[0][0])


def test_on_device_falls_back_with_a_warning_when_a_pipeline_is_listed(workdir, caplog):
    params = load_params(tiny_params(workdir, data={"on_device": True}, augment={"train": ["HorizontalFlip"]}))
    setup = build_setup(params.data, params.augment, params.model, params.train, root=workdir)
    assert type(setup.train_loader).__name__ == "DataLoader"
    assert "data.on_device needs" in caplog.text


@pytest.mark.slow
def test_a_nan_is_caught_at_the_next_check_names_its_step_and_is_never_checkpointed(workdir):
    calls = {"n": 0}

    def nan_at_step_6(*args, **kwargs):
        calls["n"] += 1
        loss, logits = train_step(*args, **kwargs)
        return (loss * math.nan if calls["n"] == 6 else loss), logits

    saved = []
    hooks = FitHooks(save_last=saved.append, save_best=saved.append)
    with pytest.raises(DivergenceError, match="the training loss became nan at epoch 1, step 6"):
        fit_tiny(workdir, hooks=hooks, step_fn=nan_at_step_6, check_every=4)
    assert calls["n"] == 8  # trained on to the check at step 8, the end of the epoch (8 steps of 64 images)
    assert saved == []  # nothing was checkpointed after the bad step


@pytest.mark.slow
def test_a_stop_waits_for_the_next_check_and_resumes_exactly(workdir):
    straight, _ = fit_tiny(workdir, check_every=4)
    steps = {"n": 0}

    def counting(*args, **kwargs):
        steps["n"] += 1
        return train_step(*args, **kwargs)

    saved = []
    with pytest.raises(Interrupted, match="stopped at epoch 1, step 4 of 8"):
        fit_tiny(workdir, hooks=FitHooks(save_last=saved.append), should_stop=lambda: steps["n"] >= 2,
             step_fn=counting, check_every=4)
    assert steps["n"] == 4 and saved[-1]["partial"]["step_in_epoch"] == 4
    resumed, _ = fit_tiny(workdir, resume_state=saved[-1], check_every=4)
    assert [r["val_top1"] for r in resumed.history] == [r["val_top1"] for r in straight.history]
    for k, v in straight.best_state.items():
        assert torch.equal(v, resumed.best_state[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs_through_the_real_trainer_on_cpu_and_resumes(workdir, amp):
    from onecycle.core.paths import Workspace
    from onecycle.stages import train
    from onecycle.stages.command import guarded

    params = load_params(tiny_params(workdir, train={"epochs": 2, "amp": amp, "amp_on_cpu": True}))
    setup = build_setup(params.data, params.augment, params.model, params.train, root=workdir)
    assert setup.dtype == (torch.bfloat16 if amp == "bf16" else torch.float16)
    dtypes, calls = set(), {"n": 0}

    def recording(model, images, labels, optimizer, scaler, *rest):
        calls["n"] += 1
        if calls["n"] == 11:  # epoch 2, step 3: stop as a crash would
            raise KeyboardInterrupt
        loss, logits = train_step(model, images, labels, optimizer, scaler, *rest)
        dtypes.add(logits.dtype)
        assert scaler.is_enabled() == (amp == "fp16")
        return loss, logits

    ws = Workspace(workdir)
    assert guarded("train", lambda: train.run(params, ws, step_fn=recording)) == 130
    assert dtypes == {setup.dtype}  # autocast ran the convolutions in reduced precision
    last = ckpt.load(workdir / "checkpoints/last.pt")
    assert last["epoch"] == 1 and ("scale" in last["scaler"]) == (amp == "fp16")  # the GradScaler state resumes
    assert guarded("train", lambda: train.run(params, ws)) == 0
    history = ckpt.load(workdir / "checkpoints/last.pt")["history"]
    assert len(history) == 2 and all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in history)
