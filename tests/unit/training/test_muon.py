"""optimizer.name muon: Muon (torch.optim.Muon's update, conv filters flattened) for the weight matrices, SGD for the
rest, as one optimizer that the schedule, the LR range test and checkpoints drive; resume is bit-exact."""

from __future__ import annotations

import json

import pytest
import torch

from onecycle.config import parse_params
from onecycle.training import checkpoint as ckpt
from onecycle.training.engine import build_optimizer
from onecycle.training.models import ResNet9
from onecycle.training.optimizers import muon_param_groups, muon_sgd
from onecycle.training.schedule import build_scheduler
from tiny import tiny_params, write_fetched


def _muon_cfg(**optimizer):
    return parse_params({"optimizer": {"name": "muon", **optimizer}}).optimizer


def test_muon_takes_the_conv_weights_and_sgd_the_norms_biases_and_the_head():
    net = ResNet9(num_classes=10, in_channels=1, width=0.125, whiten=True)
    opt = build_optimizer(_muon_cfg(muon_lr_ratio=2.0), net, lr=0.1)
    assert isinstance(opt, muon_sgd())
    muon = [p for g in opt.param_groups if g["muon"] for p in g["params"]]
    sgd = [p for g in opt.param_groups if not g["muon"] for p in g["params"]]
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad]
    assert {id(p) for p in muon} == {id(p) for p in convs} and all(p.ndim == 4 for p in muon)
    assert any(p is net.fc.weight for p in sgd)  # the classifier head stays with SGD
    assert not any(p is net.prep[0].weight for p in muon + sgd)  # the frozen whitening conv is not optimized
    assert all(g["lr_ratio"] == (2.0 if g["muon"] else 1.0) for g in opt.param_groups)
    # weight decay per group is kept: none on the norms and biases
    assert {(g["muon"], g["weight_decay"]) for g in opt.param_groups} == {(True, 5e-4), (False, 5e-4), (False, 0.0)}


def test_a_conv_weight_steps_as_torch_muon_steps_its_flattened_matrix_and_the_rest_as_torch_sgd():
    torch.manual_seed(0)
    conv = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last).requires_grad_()  # as train.channels_last
    bias = torch.randn(8, requires_grad=True)
    head = torch.randn(3, 8, requires_grad=True)
    ref_conv = conv.detach().flatten(1).clone().requires_grad_()
    ref_rest = [bias.detach().clone().requires_grad_(), head.detach().clone().requires_grad_()]
    opt = muon_sgd()(muon_param_groups([{"params": [conv, bias, head], "weight_decay": 0.01}], lr_ratio=2.0),
                  lr=0.1, momentum=0.9, nesterov=True)
    ref_muon = torch.optim.Muon([ref_conv], lr=0.2, weight_decay=0.01, momentum=0.9, nesterov=True)
    ref_sgd = torch.optim.SGD(ref_rest, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for _ in range(3):
        grads = [torch.randn_like(conv), torch.randn_like(bias), torch.randn_like(head)]
        for p, g in zip((conv, bias, head), grads, strict=True):
            p.grad = g.clone()
        ref_conv.grad = grads[0].flatten(1).clone()
        for p, g in zip(ref_rest, grads[1:], strict=True):
            p.grad = g.clone()
        opt.step()
        ref_muon.step()
        ref_sgd.step()
    assert torch.equal(conv.detach().flatten(1), ref_conv.detach())
    assert conv.is_contiguous(memory_format=torch.channels_last)  # updated in place, its layout kept
    assert torch.equal(bias, ref_rest[0]) and torch.equal(head, ref_rest[1])
    # one state_dict: the Muon buffer in the flattened shape, SGD's beside it; it loads back into a fresh optimizer
    state = opt.state_dict()
    assert [tuple(s["momentum_buffer"].shape) for s in state["state"].values()] == [(8, 36), (8,), (3, 8)]
    again = muon_sgd()(muon_param_groups([{"params": [conv, bias, head], "weight_decay": 0.01}], lr_ratio=2.0),
                    lr=0.1, momentum=0.9, nesterov=True)
    again.load_state_dict(state)
    assert torch.equal(again.state[conv]["momentum_buffer"], opt.state[conv]["momentum_buffer"])


def test_the_schedule_sets_one_lr_and_momentum_and_muon_groups_step_at_the_ratio():
    net = ResNet9(num_classes=10, in_channels=1, width=0.125)
    opt = build_optimizer(_muon_cfg(muon_lr_ratio=3.0), net, lr=0.01)
    sched = build_scheduler(opt, parse_params({}).schedule, 0.4, epochs=2, steps_per_epoch=10)
    for _ in range(5):
        sched.step()
    assert len({g["lr"] for g in opt.param_groups}) == 1 and len({g["momentum"] for g in opt.param_groups}) == 1
    lr = opt.param_groups[0]["lr"]
    # the step a Muon weight takes: torch.optim.Muon's at 3 x the scheduled LR
    torch.manual_seed(1)
    conv = net.layer1[0][0].weight
    before = conv.detach().clone()
    for p in net.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    ref = before.flatten(1).clone().requires_grad_()
    ref.grad = conv.grad.flatten(1).clone()
    opt.step()
    torch.optim.Muon([ref], lr=3.0 * lr, weight_decay=5e-4, momentum=opt.param_groups[0]["momentum"]).step()
    assert torch.equal(conv.detach().flatten(1), ref.detach())


def test_the_lr_range_test_runs_with_muon(tmp_path):
    from onecycle.config import load_params
    from onecycle.training.engine import build_setup
    from onecycle.training.rangetest import run_range_test

    write_fetched(tmp_path / "data", n_train=400, n_test=50)
    params = load_params(tiny_params(tmp_path, optimizer={"name": "muon"}))
    setup = build_setup(params.data, params.augment, params.model, params.train, root=tmp_path)
    before = {k: v.clone() for k, v in setup.net.state_dict().items()}
    result = run_range_test(setup, optimizer=params.optimizer, lr_find=params.lr_find, train=params.train,
                            progress=False)
    assert len(result.lrs) >= 5 and all(b > a for a, b in zip(result.lrs, result.lrs[1:], strict=False))
    assert all(torch.equal(v, setup.net.state_dict()[k]) for k, v in before.items())  # the sweep leaves no trace


@pytest.mark.slow
def test_a_muon_training_checkpointed_and_resumed_equals_an_uninterrupted_one(tmp_path):
    from onecycle.config import load_params
    from onecycle.core.paths import Workspace
    from onecycle.stages import train
    from onecycle.stages.command import guarded
    from onecycle.training.engine import train_step

    results = {}
    for name in ("straight", "interrupted"):
        work = tmp_path / name
        write_fetched(work / "data", n_train=600, n_test=100)
        tiny_params(work, train={"epochs": 3}, optimizer={"name": "muon", "muon_lr_ratio": 2.0})
        params, ws = load_params(work / "params.yaml"), Workspace(work)
        if name == "interrupted":
            calls = {"n": 0}

            def crash_in_epoch_2(*args, calls=calls, **kwargs):  # 8 steps per epoch: the 3rd step of epoch 2, after
                # the checkpoint of epoch 1
                calls["n"] += 1
                if calls["n"] == 11:
                    raise KeyboardInterrupt
                return train_step(*args, **kwargs)

            assert guarded("train", lambda p=params, w=ws, f=crash_in_epoch_2: train.run(p, w, step_fn=f)) == 130
            first = ckpt.load(work / "checkpoints/last.pt")
            assert first["epoch"] == 1
            assert any(len(s["momentum_buffer"].shape) == 2 and s["momentum_buffer"].shape[1] % 9 == 0
                       for s in first["optimizer"]["state"].values())  # Muon's flattened filters' momentum
        assert guarded("train", lambda p=params, w=ws: train.run(p, w)) == 0
        results[name] = (ckpt.load(work / "models/model.pt")["state_dict"],
                         json.loads((work / "reports/train.json").read_text()),
                         (work / "reports/schedule.csv").read_text())
    (a, a_summary, a_sched), (b, b_summary, b_sched) = results["straight"], results["interrupted"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a_sched == b_sched
    assert {k: v for k, v in a_summary.items() if "second" not in k} == \
        {k: v for k, v in b_summary.items() if "second" not in k}  # the scores; the wall clock differs
