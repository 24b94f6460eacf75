"""The LR schedule of a training: ``schedule.*`` resolved into a :class:`~onecycle.training.policies.Plan`, and the
scheduler that applies the chosen policy (:data:`~onecycle.training.policies.POLICIES`) to an optimizer.

The scheduler is stepped once per optimizer step, right after ``optimizer.step()``, in the training loop's one
place for it (:func:`onecycle.training.loop.train_one_epoch`). Step ``i`` (0-based) runs at the LR (and momentum)
the policy gives for ``i``; for ``one_cycle`` that is exactly torch's ``OneCycleLR``: the LR peaks at step
``pct_start * total_steps - 1`` and the last step runs at ``max_lr / div_factor / final_div_factor``.
:func:`lr_and_momentum_at` gives the same values without an optimizer (resume's reconciliation);
:func:`resolve_pct_start` and :func:`peak_fraction` say where the peak is (tune's search space and pruner).
"""

from __future__ import annotations

import torch

from onecycle.core.errors import ConfigError
from onecycle.core.words import count
from onecycle.training.policies import POLICIES, Plan


class ScheduleTooShortError(ConfigError):
    """The policy's phases do not fit in the run's optimizer steps."""


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


def make_plan(sched_cfg, max_lr: float, epochs: int, steps_per_epoch: int) -> Plan:
    """The ``schedule`` section, for a run of ``epochs * steps_per_epoch`` optimizer steps peaking at ``max_lr``."""
    return Plan(max_lr=float(max_lr), total_steps=epochs * steps_per_epoch,
                pct_start=resolve_pct_start(sched_cfg, epochs), div_factor=sched_cfg.div_factor,
                final_div_factor=sched_cfg.final_div_factor, three_phase=sched_cfg.three_phase,
                anneal_strategy=sched_cfg.anneal_strategy, cycle_momentum=sched_cfg.cycle_momentum,
                base_momentum=sched_cfg.base_momentum, max_momentum=sched_cfg.max_momentum)


def lr_and_momentum_at(sched_cfg, max_lr: float, epochs: int, steps_per_epoch: int, step: int,
                       momentum: float) -> tuple[float, float]:
    """The LR and momentum (SGD's momentum or Adam's beta1) that optimizer step ``step`` (0-based) runs at, as
    :func:`build_scheduler`'s scheduler sets them. ``momentum`` is the optimizer's own, for policies (and
    ``cycle_momentum: false``) that leave it alone."""
    lr, m = POLICIES.lookup(sched_cfg.policy).lr_at(step, make_plan(sched_cfg, max_lr, epochs, steps_per_epoch))
    return lr, momentum if m is None else m


class PolicyScheduler:
    """Sets every parameter group's LR (and momentum or Adam's beta1, where the policy cycles it) for the next
    optimizer step. ``step()`` after each optimizer step; the state is the number of steps taken."""

    def __init__(self, optimizer: torch.optim.Optimizer, policy: str, plan: Plan):
        self.optimizer, self.plan = optimizer, plan
        self.lr_at = POLICIES.lookup(policy).lr_at
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        # after the last optimizer step the next LR is never used: hold the last one
        lr, momentum = self.lr_at(min(self.last_step, self.plan.total_steps - 1), self.plan)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if momentum is None:
                continue
            if "betas" in group:
                group["betas"] = (momentum, *group["betas"][1:])
            else:
                group["momentum"] = momentum

    def step(self) -> None:
        """Move to the next optimizer step's LR."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The LR of each parameter group for the next optimizer step."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """What resumes the schedule: the steps taken."""
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state['last_step']`` steps."""
        self.last_step = int(state["last_step"])
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, sched_cfg, max_lr: float, epochs: int,
                    steps_per_epoch: int) -> PolicyScheduler:
    """``schedule.policy`` over ``epochs * steps_per_epoch`` optimizer steps with every knob of ``schedule.*``."""
    check_fits(sched_cfg, epochs, steps_per_epoch)
    return PolicyScheduler(optimizer, sched_cfg.policy, make_plan(sched_cfg, max_lr, epochs, steps_per_epoch))


def check_fits(sched_cfg, epochs: int, steps_per_epoch: int) -> None:
    """Refuse, in one line naming the keys, a schedule whose phases do not fit in the run's optimizer steps
    (One Cycle: a warm-up or annealing of at most one step would divide by zero mid-training)."""
    total = epochs * steps_per_epoch
    plan = make_plan(sched_cfg, 1.0, epochs, steps_per_epoch)
    check = POLICIES.lookup(sched_cfg.policy).check
    problem = check(plan) if check is not None and total > 0 else None
    if total > 0 and problem is None:
        return
    pct_key = (f"schedule.peak_epoch {sched_cfg.peak_epoch:g}" if peak_overrides_pct_start(sched_cfg)
               else f"schedule.pct_start {plan.pct_start:g}")
    raise ScheduleTooShortError(
        f"the {sched_cfg.policy} schedule does not fit in {count(total, 'optimizer step')} "
        f"(train.epochs {epochs} x {count(steps_per_epoch, 'step')} an epoch from data.train_subset/data.batch_size): "
        f"with "
        f"{pct_key}{' and schedule.three_phase' if sched_cfg.three_phase else ''} {problem or 'there is no step'}; "
        f"raise train.epochs or the steps an epoch, or change {pct_key.split()[0]}")


def current_momentum(optimizer: torch.optim.Optimizer) -> float:
    """SGD momentum, or Adam's beta1."""
    group = optimizer.param_groups[0]
    if "betas" in group:
        return float(group["betas"][0])
    return float(group.get("momentum", 0.0))
