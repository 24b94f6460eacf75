"""The One Cycle policy (Smith & Topin): its arithmetic, in one place, and the scheduler built on
``torch.optim.lr_scheduler.OneCycleLR``.

The scheduler is stepped once per optimizer step, right after ``optimizer.step()``, in the training
loop's one place for it (:func:`onecycle.training.loop.train_one_epoch`). Step ``i`` (0-based) uses the LR
the scheduler holds after ``i`` calls to ``scheduler.step()``; the LR peaks at step
``pct_start * total_steps - 1`` and the last step runs at ``max_lr / div_factor / final_div_factor``.
:func:`lr_and_momentum_at` computes the same values without an optimizer (resume's reconciliation),
:func:`resolve_pct_start` and :func:`peak_fraction` say where the peak is (tune's search space and pruner).
"""

from __future__ import annotations

import math

import torch

from onecycle.core.errors import ConfigError


class ScheduleTooShortError(ConfigError):
    """The One Cycle phases do not fit in the run's optimizer steps (OneCycleLR would divide by zero)."""


def peak_overrides_pct_start(sched_cfg) -> bool:
    """Whether ``schedule.peak_epoch`` is set, and so ``pct_start`` is not used (nor worth searching)."""
    return sched_cfg.peak_epoch is not None


def resolve_pct_start(sched_cfg, epochs: int) -> float:
    """``pct_start``, or ``peak_epoch / epochs`` when ``peak_epoch`` is given (CIFAR recipe: 5 of 24)."""
    if peak_overrides_pct_start(sched_cfg):
        return sched_cfg.peak_epoch / epochs
    return sched_cfg.pct_start


def peak_fraction(sched_cfg, epochs: int, pct_start: float | None = None) -> float:
    """The fraction of training spent warming up: ``pct_start`` (or the given one, e.g. the largest a search
    space allows) unless ``peak_epoch`` sets it, capped at 1."""
    if pct_start is not None and not peak_overrides_pct_start(sched_cfg):
        return pct_start
    return min(resolve_pct_start(sched_cfg, epochs), 1.0)


def _phases(sched_cfg, max_lr: float, total: int, pct: float) -> list[tuple[float, float, float, str, str]]:
    """(end step, start LR, end LR, start momentum, end momentum) of each phase, as OneCycleLR builds them."""
    initial = max_lr / sched_cfg.div_factor
    final = initial / sched_cfg.final_div_factor
    if sched_cfg.three_phase:
        return [(float(pct * total) - 1, initial, max_lr, "max", "base"),
                (float(2 * pct * total) - 2, max_lr, initial, "base", "max"),
                (total - 1, initial, final, "max", "max")]
    return [(float(pct * total) - 1, initial, max_lr, "max", "base"), (total - 1, max_lr, final, "base", "max")]


def _anneal(strategy: str, start: float, end: float, pct: float) -> float:
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


def lr_and_momentum_at(sched_cfg, max_lr: float, epochs: int, steps_per_epoch: int, step: int,
                       momentum: float) -> tuple[float, float]:
    """The LR and momentum (SGD's momentum or Adam's beta1) that optimizer step ``step`` (0-based) runs at:
    what :func:`build_scheduler`'s scheduler holds after ``step`` calls, computed as OneCycleLR does.
    ``momentum`` is the optimizer's own, used when ``cycle_momentum`` is off."""
    total = epochs * steps_per_epoch
    momenta = {"max": sched_cfg.max_momentum, "base": sched_cfg.base_momentum}
    phases = _phases(sched_cfg, max_lr, total, resolve_pct_start(sched_cfg, epochs))
    start = 0.0
    for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            pct = (step - start) / (end - start)
            lr = _anneal(sched_cfg.anneal_strategy, lr0, lr1, pct)
            if sched_cfg.cycle_momentum:
                momentum = _anneal(sched_cfg.anneal_strategy, momenta[m0], momenta[m1], pct)
            return lr, momentum
        start = end
    raise AssertionError("unreachable: the last phase takes every later step")


def build_scheduler(optimizer: torch.optim.Optimizer, sched_cfg, max_lr: float, epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycleLR over ``epochs * steps_per_epoch`` optimizer steps with every knob of ``schedule.*``."""
    check_fits(sched_cfg, epochs, steps_per_epoch)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=epochs * steps_per_epoch,
        pct_start=resolve_pct_start(sched_cfg, epochs),
        anneal_strategy=sched_cfg.anneal_strategy,
        cycle_momentum=sched_cfg.cycle_momentum,
        base_momentum=sched_cfg.base_momentum,
        max_momentum=sched_cfg.max_momentum,
        div_factor=sched_cfg.div_factor,
        final_div_factor=sched_cfg.final_div_factor,
        three_phase=sched_cfg.three_phase,
    )


def check_fits(sched_cfg, epochs: int, steps_per_epoch: int) -> None:
    """Refuse, in one line naming the keys, a schedule whose warm-up or annealing is at most one step.

    ``OneCycleLR`` ends phase i at step ``end_i`` (warm-up: ``pct * T - 1``) and divides by ``end_i - end_{i-1}``:
    a phase of length zero is a ZeroDivisionError mid-training, a negative one a meaningless curve.
    """
    total = epochs * steps_per_epoch
    pct = resolve_pct_start(sched_cfg, epochs)
    ends = [phase[0] for phase in _phases(sched_cfg, 1.0, total, pct)]
    lengths = [ends[0], *(b - a for a, b in zip(ends, ends[1:], strict=False))]
    if min(lengths) > 0:
        return
    pct_key = (f"schedule.peak_epoch {sched_cfg.peak_epoch:g}" if peak_overrides_pct_start(sched_cfg)
               else f"schedule.pct_start {pct:g}")
    raise ScheduleTooShortError(
        f"the One Cycle schedule does not fit in {total} optimizer step{'s' if total != 1 else ''} (train.epochs "
        f"{epochs} x {steps_per_epoch} steps an epoch from data.train_subset/data.batch_size): with {pct_key}"
        f"{' and schedule.three_phase' if sched_cfg.three_phase else ''} the warm-up needs more than 1 step and the "
        f"annealing at least 1; raise train.epochs or the steps an epoch, or change {pct_key.split()[0]}")


def current_momentum(optimizer: torch.optim.Optimizer) -> float:
    """SGD momentum, or Adam's beta1."""
    group = optimizer.param_groups[0]
    if "betas" in group:
        return float(group["betas"][0])
    return float(group.get("momentum", 0.0))
