"""Accuracy levers: weight averaging (lookahead, EMA: the update rules, the final network is the average, resume
is exact) and the whitening convolution (it whitens training patches, stays frozen, is resnet9's default only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onecycle.config import load_params
from onecycle.training.averaging import LOOKAHEAD_DECAY, LOOKAHEAD_EVERY, WeightAverage
from onecycle.training.engine import build_setup, train_step
from onecycle.training.loop import FitHooks, Interrupted, fit
from tiny import tiny_params


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def _bump(net: nn.Module, by: float) -> None:
    with torch.no_grad():
        for v in net.state_dict().values():
            v.add_(by if v.is_floating_point() else 1)  # as a training step would, num_batches_tracked included


def test_lookahead_pulls_the_weights_back_every_fifth_step_and_more_strongly_near_the_end():
    net, total = _net(), 20
    avg = WeightAverage(net, "lookahead", total)
    w0 = net[0].weight.detach().clone()
    for step in range(1, LOOKAHEAD_EVERY):
        _bump(net, 1.0)
        avg.update(step)
    assert torch.allclose(net[0].weight, w0 + LOOKAHEAD_EVERY - 1)  # nothing happens between updates
    _bump(net, 1.0)
    avg.update(LOOKAHEAD_EVERY)
    decay = LOOKAHEAD_DECAY * (LOOKAHEAD_EVERY / total) ** 3
    expected = w0 + (1 - decay) * LOOKAHEAD_EVERY  # the slow weights moved by 1 - decay, the fast restart there
    assert torch.allclose(net[0].weight, expected) and torch.allclose(avg.average[avg.names.index("0.weight")], expected)
    assert torch.allclose(net[1].running_mean, torch.full((2,), (1 - decay) * LOOKAHEAD_EVERY))  # BN statistics too
    assert net[1].num_batches_tracked.item() == LOOKAHEAD_EVERY  # integer buffers are the network's own
    for step in range(LOOKAHEAD_EVERY + 1, total + 1):
        _bump(net, 1.0)
        avg.update(step)
    last = net[0].weight.detach().clone()
    _bump(net, 1.0)  # the final decay is 0.95**5: one step late in the run moves the average by 1 - 0.774 only
    avg.update(total)
    assert torch.allclose(net[0].weight, last + (1 - LOOKAHEAD_DECAY))


def test_ema_follows_the_weights_with_a_warmed_up_decay_and_finish_hands_them_over():
    net = _net()
    avg = WeightAverage(net, "ema", 100, ema_decay=0.5)
    w0 = net[0].weight.detach().clone()
    _bump(net, 1.0)
    avg.update(1)  # decay min(0.5, 2/11) = 2/11
    ema = w0 + 9 / 11
    assert torch.allclose(avg.average[avg.names.index("0.weight")], ema)
    assert torch.allclose(net[0].weight, w0 + 1)  # the network keeps its own weights
    _bump(net, 1.0)
    avg.update(50)  # decay min(0.5, 51/60) = 0.5
    ema = 0.5 * ema + 0.5 * (w0 + 2)
    assert torch.allclose(avg.average[avg.names.index("0.weight")], ema)
    avg.finish()
    assert torch.allclose(net[0].weight, ema)


def test_a_checkpointed_average_must_match_the_configuration():
    state = WeightAverage(_net(), "ema", 10, 0.9).state_dict()
    with pytest.raises(ValueError, match="does not match"):
        WeightAverage(_net(), "lookahead", 10).load_state_dict(state)


def _fit(workdir, average, *, hooks=None, resume_state=None, should_stop=None, step_fn=train_step):
    params = load_params(tiny_params(workdir, train={"epochs": 2, "check_every": 3, "average": average,
                                                     "ema_decay": 0.9}))
    setup = build_setup(params.data, params.augment, params.model, params.train, root=workdir)
    fit(setup, 0.05, train=params.train, schedule=params.schedule, optimizer=params.optimizer, hooks=hooks,
        resume_state=resume_state, should_stop=should_stop, progress=False, step_fn=step_fn)
    return {k: v.detach().clone() for k, v in setup.net.state_dict().items()}  # the final network


@pytest.mark.slow
@pytest.mark.parametrize("average", ["lookahead", "ema"])
def test_the_final_network_is_the_average_and_a_run_stopped_mid_epoch_resumes_exactly(workdir, average):
    plain = _fit(workdir, "none")
    straight = _fit(workdir, average)
    assert any(not torch.equal(v, plain[k]) for k, v in straight.items())  # averaging changed the result
    steps, saved = {"n": 0}, []

    def counting(*args, **kwargs):
        steps["n"] += 1
        return train_step(*args, **kwargs)

    with pytest.raises(Interrupted, match="stopped at epoch 2, step 3 of 8"):  # a lookahead update (step 10) is due
        _fit(workdir, average, hooks=FitHooks(save_last=saved.append), should_stop=lambda: steps["n"] >= 9,
             step_fn=counting)
    assert saved[-1]["average"]["kind"] == average
    resumed = _fit(workdir, average, resume_state=saved[-1])
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), k


def test_the_whitening_convolution_whitens_training_patches_and_stays_frozen(workdir):
    import torch.nn.functional as F

    from onecycle.training.engine import whitening_batches
    from onecycle.training.models import WHITEN_EPS

    params = load_params(tiny_params(workdir, train={"epochs": 1}))  # resnet9's default
    setup = build_setup(params.data, params.augment, params.model, params.train, root=workdir)
    conv = setup.net.prep[0]
    assert conv.out_channels == 18 and not conv.weight.requires_grad  # 9 eigenvectors of grey 3x3 patches, +-
    images = torch.cat(list(whitening_batches(params.data, params.augment, setup.info, params.train.seed))).double()
    patches = F.unfold(images, 3).transpose(1, 2).reshape(-1, 9)
    eigenvalues = torch.linalg.eigvalsh(patches.T @ patches / patches.shape[0])
    out = F.conv2d(images, conv.weight.double())[:, :9]  # the first 9 filters over the same (unpadded) patches
    flat = out.permute(0, 2, 3, 1).reshape(-1, 9)
    cov = flat.T @ flat / flat.shape[0]
    expected = torch.diag(eigenvalues / (eigenvalues + WHITEN_EPS))  # white up to the eps
    assert torch.allclose(cov, expected, atol=1e-6)
    before = conv.weight.detach().clone()
    fit(setup, 0.05, train=params.train, schedule=params.schedule, optimizer=params.optimizer, progress=False)
    assert torch.equal(conv.weight, before)  # frozen: the optimizer never moved it
    assert any(not torch.equal(a, b) for a, b in zip(setup.net.prep[1].parameters(), (torch.ones(18), torch.zeros(18)), strict=True))


def test_whiten_is_resnet9_with_the_cifar_stem_only(workdir):
    from onecycle.config import ModelConfig

    assert ModelConfig().whiten and not ModelConfig(name="resnet18").whiten and not ModelConfig(stem="imagenet").whiten
    # params.yaml says whiten: true; switching the model must not need a second override, and the params say false
    params = load_params(tiny_params(workdir, model={"whiten": True, "name": "resnet18", "width": 1.0}))
    assert params.model.whiten is False and params.flat()["model.whiten"] is False
