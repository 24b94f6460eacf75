"""The One Cycle policy (Smith & Topin), built on ``torch.optim.lr_scheduler.OneCycleLR``.

The scheduler is stepped once per optimizer step, right after ``optimizer.step()``, in the training
loop's one place for it (``train.train_one_epoch``). Step ``i`` (0-based) uses the LR the scheduler
holds after ``i`` calls to ``scheduler.step()``; the LR peaks at step ``pct_start * total_steps - 1``
and the last step runs at ``max_lr / div_factor / final_div_factor``.
"""

from __future__ import annotations

import torch

from .errors import ConfigError


class ScheduleTooShortError(ConfigError):
    """The One Cycle phases do not fit in the run's optimizer steps (OneCycleLR would divide by zero)."""


def resolve_pct_start(sched_cfg, epochs: int) -> float:
    """``pct_start``, or ``peak_epoch / epochs`` when ``peak_epoch`` is given (CIFAR recipe: 5 of 24)."""
    if sched_cfg.peak_epoch is not None:
        return sched_cfg.peak_epoch / epochs
    return sched_cfg.pct_start


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
    ends = [pct * total - 1, 2 * pct * total - 2, total - 1] if sched_cfg.three_phase else [pct * total - 1, total - 1]
    lengths = [ends[0], *(b - a for a, b in zip(ends, ends[1:], strict=False))]
    if min(lengths) > 0:
        return
    pct_key = (f"schedule.peak_epoch {sched_cfg.peak_epoch:g}" if sched_cfg.peak_epoch is not None
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
