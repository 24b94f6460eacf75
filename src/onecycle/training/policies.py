"""The LR schedule policies (``schedule.policy``): each a pure function of the optimizer step that gives its LR, and
the momentum where the policy cycles it. Registered in :data:`POLICIES`, whose names are the values the config
accepts; :class:`onecycle.training.schedule.PolicyScheduler` applies one to an optimizer, once per step.

Every policy reads the same :class:`Plan` (plain numbers, from ``schedule.*``): the peak ``max_lr`` (the LR range
test's suggestion when ``schedule.max_lr`` is ``auto``), ``initial_lr = max_lr / div_factor``, ``final_lr =
initial_lr / final_div_factor`` and the warm-up fraction ``pct_start``. A policy that needs more than the steps it
is given raises nothing mid-training: its ``check`` refuses the plan up front, in one line naming the keys.

Adding a policy is one function here, decorated with ``@policy("name")``, and its test. Imports only the standard
library (params load without numpy or torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from onecycle.core.registry import Registry

# A policy: (optimizer step, 0-based; the plan) -> (LR, momentum or None to leave the optimizer's own).
PolicyFn = Callable[[int, "Plan"], tuple[float, float | None]]

# The step policy divides the LR by 10 at each of these fractions of the steps (the ResNet papers' 30/60/90 of
# 90 epochs, as fractions of a shorter run).
STEP_AT = (0.5, 0.75)


@dataclass(frozen=True)
class Plan:
    """What a policy needs, as plain numbers: the schedule section resolved for one run."""

    max_lr: float
    total_steps: int
    pct_start: float  # fraction of the steps spent warming up (peak_epoch / epochs when that is given)
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False
    anneal_strategy: str = "cos"  # cos | linear: one_cycle's annealing
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95

    @property
    def initial_lr(self) -> float:
        return self.max_lr / self.div_factor

    @property
    def final_lr(self) -> float:
        return self.initial_lr / self.final_div_factor


@dataclass(frozen=True)
class Policy:
    """A registered policy: its LR function, and an optional ``check(plan) -> problem or None``."""

    lr_at: PolicyFn
    check: Callable[[Plan], str | None] | None = None


POLICIES: Registry[Policy] = Registry("schedule.policy")


def policy(name: str, check: Callable[[Plan], str | None] | None = None) -> Callable[[PolicyFn], PolicyFn]:
    """Decorator: register the decorated ``lr_at(step, plan)`` as ``schedule.policy: name``."""
    def add(fn: PolicyFn) -> PolicyFn:
        POLICIES.register(name)(Policy(fn, check))
        return fn

    return add


def anneal_cos(start: float, end: float, pct: float) -> float:
    """Cosine from ``start`` (pct 0) to ``end`` (pct 1), as torch's OneCycleLR computes it."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def anneal_linear(start: float, end: float, pct: float) -> float:
    """Straight from ``start`` (pct 0) to ``end`` (pct 1), as torch's OneCycleLR computes it."""
    return (end - start) * pct + start


ANNEALERS = {"cos": anneal_cos, "linear": anneal_linear}


def _one_cycle_phases(plan: Plan) -> list[tuple[float, float, float, str, str]]:
    """(end step, start LR, end LR, start momentum, end momentum) of each phase, as OneCycleLR builds them."""
    total, pct, peak, initial, final = plan.total_steps, plan.pct_start, plan.max_lr, plan.initial_lr, plan.final_lr
    if plan.three_phase:
        return [(float(pct * total) - 1, initial, peak, "max", "base"),
                (float(2 * pct * total) - 2, peak, initial, "base", "max"),
                (total - 1, initial, final, "max", "max")]
    return [(float(pct * total) - 1, initial, peak, "max", "base"), (total - 1, peak, final, "base", "max")]


def _one_cycle_fits(plan: Plan) -> str | None:
    """OneCycleLR divides by each phase's length: a phase of at most one step cannot be annealed."""
    ends = [phase[0] for phase in _one_cycle_phases(plan)]
    lengths = [ends[0], *(b - a for a, b in zip(ends, ends[1:], strict=False))]
    if min(lengths) > 0:
        return None
    return "the warm-up needs more than 1 step and the annealing at least 1"


@policy("one_cycle", check=_one_cycle_fits)
def one_cycle(step: int, plan: Plan) -> tuple[float, float | None]:
    """Smith & Topin's One Cycle, exactly as torch's OneCycleLR: warm up from initial_lr to max_lr over pct_start
    (momentum down from max_momentum to base_momentum), anneal to final_lr (momentum back up); ``three_phase``
    returns to initial_lr first, as fastai's original did."""
    anneal = ANNEALERS[plan.anneal_strategy]
    momenta = {"max": plan.max_momentum, "base": plan.base_momentum}
    phases = _one_cycle_phases(plan)
    start = 0.0
    for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            pct = (step - start) / (end - start)
            momentum = anneal(momenta[m0], momenta[m1], pct) if plan.cycle_momentum else None
            return anneal(lr0, lr1, pct), momentum
        start = end
    raise AssertionError("unreachable: the last phase takes every later step")


def _warm_then(step: int, plan: Plan, down: Callable[[float, float, float], float]) -> float:
    """A linear warm-up from initial_lr to max_lr, peaking at step ``pct_start * total - 1`` (where One Cycle
    peaks), then ``down`` from max_lr to final_lr at the last step. A warm-up shorter than a step is skipped."""
    peak, last = plan.pct_start * plan.total_steps - 1, plan.total_steps - 1
    if peak > 0 and step <= peak:
        return anneal_linear(plan.initial_lr, plan.max_lr, step / peak)
    start = max(peak, 0.0)
    return down(plan.max_lr, plan.final_lr, min((step - start) / (last - start), 1.0) if last > start else 1.0)


@policy("cosine")
def cosine(step: int, plan: Plan) -> tuple[float, float | None]:
    """Linear warm-up over pct_start, then cosine down to final_lr (the transformer recipe; SGDR without restarts)."""
    return _warm_then(step, plan, anneal_cos), None


@policy("linear")
def linear(step: int, plan: Plan) -> tuple[float, float | None]:
    """Linear warm-up over pct_start, then straight down to final_lr."""
    return _warm_then(step, plan, anneal_linear), None


@policy("step")
def step_decay(step: int, plan: Plan) -> tuple[float, float | None]:
    """max_lr, divided by 10 at each fraction of :data:`STEP_AT` of the steps (the classic ResNet decay; no warm-up)."""
    drops = sum(step >= int(at * plan.total_steps) for at in STEP_AT)
    return plan.max_lr / 10 ** drops, None


@policy("constant")
def constant(step: int, plan: Plan) -> tuple[float, float | None]:
    """max_lr at every step."""
    return plan.max_lr, None
