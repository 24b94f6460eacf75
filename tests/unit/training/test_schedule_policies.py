"""The schedule policies: each registered one's shape, step by step, its resume, and the config's allowed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onecycle.config import parse_params
from onecycle.core.errors import ConfigError
from onecycle.training.policies import POLICIES, STEP_AT, Plan
from onecycle.training.schedule import ScheduleTooShortError, build_scheduler, check_fits, current_momentum


def _curve(policy: str, epochs: int = 4, steps_per_epoch: int = 10, max_lr: float = 0.4, optimizer: str = "sgd",
           **schedule) -> np.ndarray:
    """(lr, momentum) of every optimizer step of a run under ``policy``, stepping the scheduler as training does."""
    params = parse_params({"schedule": {"policy": policy, "max_lr": max_lr, **schedule},
                           "optimizer": {"name": optimizer}})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9) if optimizer == "sgd" else \
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0, betas=(0.9, 0.999))
    sched = build_scheduler(opt, params.schedule, max_lr, epochs, steps_per_epoch)
    seen = []
    for _ in range(epochs * steps_per_epoch):
        seen.append((opt.param_groups[0]["lr"], current_momentum(opt)))
        opt.step()
        sched.step()
    return np.array(seen)


def test_the_config_accepts_exactly_the_registered_policies():
    assert POLICIES.names()[:5] == ("one_cycle", "cosine", "linear", "step", "constant")  # and any added after
    assert parse_params({}).schedule.policy == "one_cycle"
    for name in POLICIES:
        assert parse_params({"schedule": {"policy": name}}).schedule.policy == name
    with pytest.raises(ConfigError, match=r"^schedule.policy must be one of .*one_cycle.*constant.*; got 'cosin'$"):
        parse_params({"schedule": {"policy": "cosin"}})


@pytest.mark.parametrize("policy", ["cosine", "linear"])
def test_warm_up_policies_peak_where_one_cycle_does_and_end_at_the_final_lr(policy):
    lrs, moms = _curve(policy).T
    one_cycle = _curve("one_cycle")[:, 0]
    assert int(np.argmax(lrs)) == int(np.argmax(one_cycle)) == 9  # pct_start 0.25 of 40 steps, less one
    assert lrs[0] == pytest.approx(0.4 / 25, rel=1e-12)
    np.testing.assert_allclose(np.diff(lrs[:10]), (0.4 - 0.4 / 25) / 9, rtol=1e-9)  # linear warm-up
    assert lrs[9] == pytest.approx(0.4, rel=1e-12)
    assert lrs[-1] == pytest.approx(0.4 / 25 / 1e4, rel=1e-9)
    assert np.all(np.diff(lrs[9:]) < 0)
    assert np.all(moms == 0.9)  # the optimizer's own momentum: only one_cycle cycles it
    middle = lrs[9 + (39 - 9) // 2]
    if policy == "linear":
        np.testing.assert_allclose(np.diff(lrs[9:]), (0.4 / 25 / 1e4 - 0.4) / 30, rtol=1e-9)
    else:  # cosine: half way down at the middle of the annealing, flat at both ends
        assert middle == pytest.approx((0.4 + 0.4 / 25 / 1e4) / 2, rel=1e-9)
        assert lrs[9] - lrs[10] < lrs[23] - lrs[24]


def test_step_divides_by_ten_at_half_and_three_quarters():
    lrs, moms = _curve("step").T
    assert STEP_AT == (0.5, 0.75)
    np.testing.assert_array_equal(lrs[:20], 0.4)
    np.testing.assert_allclose(lrs[20:30], 0.04, rtol=1e-12)
    np.testing.assert_allclose(lrs[30:], 0.004, rtol=1e-12)
    assert np.all(moms == 0.9)


def test_constant_holds_max_lr_and_leaves_adams_beta1():
    seen = _curve("constant", optimizer="adamw")
    np.testing.assert_array_equal(seen[:, 0], 0.4)
    np.testing.assert_array_equal(seen[:, 1], 0.9)


def test_one_cycle_cycles_momentum_and_the_others_do_not():
    moms = _curve("one_cycle")[:, 1]
    assert moms[0] == pytest.approx(0.95) and moms[9] == pytest.approx(0.85) and moms[-1] == pytest.approx(0.95)


@pytest.mark.parametrize("policy", POLICIES.names())
def test_every_policy_resumes_exactly_from_its_state(policy):
    full = _curve(policy, epochs=3, steps_per_epoch=7)
    params = parse_params({"schedule": {"policy": policy, "max_lr": 0.4}})
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0, momentum=0.9)
    sched = build_scheduler(opt, params.schedule, 0.4, 3, 7)
    for _ in range(8):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([p], lr=1.0, momentum=0.9)
    sched2 = build_scheduler(opt2, params.schedule, 0.4, 3, 7)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    rest = []
    for _ in range(21 - 8):
        rest.append((opt2.param_groups[0]["lr"], current_momentum(opt2)))
        opt2.step()
        sched2.step()
    np.testing.assert_array_equal(np.array(rest), full[8:])


@pytest.mark.parametrize("policy", POLICIES.names())
def test_every_policy_gives_a_finite_positive_lr_on_the_shortest_runs(policy):
    for total in (1, 2, 3, 7):
        plan = Plan(max_lr=0.4, total_steps=total, pct_start=0.25)
        problem = POLICIES[policy].check(plan) if POLICIES[policy].check else None
        if problem:
            continue
        lrs = [POLICIES[policy].lr_at(step, plan)[0] for step in range(total)]
        assert all(np.isfinite(lrs)) and min(lrs) > 0, (total, lrs)


def test_a_one_cycle_too_short_for_its_phases_is_refused_naming_the_keys():
    s = parse_params({"schedule": {"pct_start": 0.1}}).schedule
    with pytest.raises(ScheduleTooShortError, match=r"one_cycle schedule does not fit in 5 optimizer steps .*"
                                                    r"schedule.pct_start 0.1"):
        check_fits(s, 1, 5)
    check_fits(parse_params({"schedule": {"pct_start": 0.1, "policy": "cosine"}}).schedule, 1, 5)  # no warm-up: fine


def test_a_study_can_search_the_policy_as_a_categorical():
    from onecycle.tuning.space import search_space, trial_params

    params = parse_params({"schedule": {"max_lr": 0.4},
                           "tune": {"space": {"schedule.policy": {"choices": ["one_cycle", "cosine", "step"]}}}})
    space = search_space(params)
    assert space["schedule.policy"].kind == "categorical"
    assert space["schedule.policy"].choices == ("one_cycle", "cosine", "step")
    assert trial_params(params, {"schedule.policy": "cosine"}).schedule.policy == "cosine"
    bad = parse_params({"schedule": {"max_lr": 0.4}, "tune": {"space": {"schedule.policy": {"choices": ["cosin"]}}}})
    with pytest.raises(ConfigError, match=r"^tune.space.schedule.policy.choices: 'cosin' is not a valid schedule.policy"):
        search_space(bad)
