"""What a study optimizes (``tune.metric`` and ``tune.direction``, one or a list) and which of its trials a user takes.

An objective is either a per-epoch metric of the trial's history (``val/top1``, ``val/loss``, ``train/loss`` ...),
scored at the trial's best epoch in its direction, the model selection ``train`` uses, or a cost of the whole
trial (:data:`COSTS`). A cost counts the whole run, not the epochs until the best one: the recipe reaches its score
only by running its whole schedule (One Cycle anneals to the last step), so that is what adopting it costs.

Several objectives make a multi-objective study: Optuna keeps its Pareto front (``study.best_trials``). The
first objective is the score, the second the cost: ``--apply`` takes the front's best score, and ``--apply
--target T`` the cheapest trial whose score reached T. Every trial records every cost (user attrs, e.g.
``train_seconds``), so a single-objective study answers ``--target`` by its training seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onecycle.core.errors import ConfigError, OneCycleError
from onecycle.training.records import METRIC_KEYS

# A trial's costs: metric name -> what it counts.
COSTS = {
    # what `onecycle train` spends in its epoch loop: every epoch's training and validation, wall clock
    "train/seconds": "the seconds of the trial's epochs (training and each epoch's validation, wall clock)",
    "train/epochs": "the epochs the trial trains (train.epochs: its schedule spans them all)",
    "train/images": "the training images the trial sees (epochs x the training split)",
}
# The user attr of a trial that holds a cost: train/seconds -> train_seconds (a trials.csv column).
COST_ATTRS = {name: name.replace("/", "_") for name in COSTS}
# The cost a single-objective study answers --target by.
DEFAULT_COST = "train/seconds"


@dataclass(frozen=True)
class Goal:
    """One objective of the study: a metric, its direction, and its history column (None for a cost)."""

    metric: str
    direction: str
    column: str | None

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    @property
    def is_cost(self) -> bool:
        return self.column is None

    @property
    def label(self) -> str:
        """The name as a CSV column or file name can hold it: ``val_top1``, ``train_seconds``."""
        return self.metric.replace("/", "_")

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b`` in this goal's direction."""
        return a > b if self.maximize else a < b

    def reached(self, value: float, target: float) -> bool:
        """Whether ``value`` reached ``target`` in this goal's direction (at least it, or at most for a minimum)."""
        return value >= target if self.maximize else value <= target


def goals(tune, val_size: int) -> list[Goal]:
    """``tune.metric`` and ``tune.direction`` as goals; a ConfigError naming tune.metric for an unknown metric, or
    one that needs the validation split while ``data.val_size`` is 0."""
    import logging

    by_name = {name: column for column, name in METRIC_KEYS.items()}
    out = []
    for metric, direction in zip(tune.metrics, tune.directions, strict=True):
        if metric in COSTS:
            out.append(Goal(metric, direction, None))
            continue
        column = by_name.get(metric) or (metric if metric in METRIC_KEYS else None)
        if column is None:
            raise ConfigError(f"tune.metric must be one of {', '.join([*by_name, *COSTS])}; got {metric!r}")
        if column.startswith("val_") and val_size == 0:
            raise ConfigError(f"tune.metric {metric} needs a validation split, but data.val_size is 0")
        out.append(Goal(metric, direction, column))
    for goal in out:
        if ("loss" in goal.metric or goal.is_cost) and goal.maximize:
            logging.getLogger(__name__).warning("tune.metric %s has tune.direction maximize: the study looks for "
                                                "the highest", goal.metric)
    return out


def trial_costs(seconds: float, epochs: int, images_per_epoch: int) -> dict[str, float]:
    """Every cost of a finished trial (:data:`COSTS`)."""
    return {"train/seconds": round(float(seconds), 3), "train/epochs": int(epochs),
            "train/images": int(epochs) * int(images_per_epoch)}


def trial_values(goals_: list[Goal], history: list[dict], costs: dict[str, float]) -> list[float] | None:
    """The trial's value for each goal: a metric's best finite epoch, a cost as counted; None when a metric has no
    finite epoch."""
    values = []
    for goal in goals_:
        if goal.is_cost:
            values.append(float(costs[goal.metric]))
            continue
        seen = [row[goal.column] for row in history
                if row.get(goal.column) is not None and math.isfinite(row[goal.column])]
        if not seen:
            return None
        values.append(float(max(seen) if goal.maximize else min(seen)))
    return values


def front(study) -> list:
    """The study's best trials: its Pareto front (several goals), or its one best trial; [] before any completed."""
    if len(study.directions) > 1:
        return list(study.best_trials)
    try:
        return [study.best_trial]
    except ValueError:  # no complete trial yet
        return []


def best_scoring(study, goals_: list[Goal]):
    """The trial ``--apply`` writes: the best trial (one goal), or the front's best score, then lowest cost (several
    goals); None before any trial completed."""
    trials = front(study)
    if not trials:
        return None
    signs = [1.0 if g.maximize else -1.0 for g in goals_]
    return max(trials, key=lambda t: ([s * v for s, v in zip(signs, t.values, strict=True)], -t.number))


def cost_of(trial, goals_: list[Goal]) -> tuple[str, float | None]:
    """``(cost metric, value)`` of ``trial``: its second goal's value, or its recorded :data:`DEFAULT_COST` in a
    single-objective study (None when the trial did not record it)."""
    if len(goals_) > 1:
        return goals_[1].metric, trial.values[1]
    value = trial.user_attrs.get(COST_ATTRS[DEFAULT_COST])
    return DEFAULT_COST, None if value is None else float(value)


def cheapest_reaching(study, goals_: list[Goal], target: float):
    """The cheapest complete trial (by :func:`cost_of`) whose score (the first goal) reached ``target``; ties go to
    the better score, then the earlier trial. OneCycleError in one line when the first goal is a cost or no trial
    reached the target."""
    from optuna.trial import TrialState

    score = goals_[0]
    if score.is_cost:
        raise OneCycleError(f"--target applies to the score, tune.metric's first entry, but that is the cost "
                            f"{score.metric}; put the score first, e.g. tune.metric: [val/top1, {score.metric}]")
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    reached = [t for t in complete if score.reached(t.values[0], target)]
    costed = [(t, cost_of(t, goals_)[1]) for t in reached]
    costed = [(t, c) for t, c in costed if c is not None]
    if not costed:
        best = best_scoring(study, goals_)
        best_txt = f"; the best is trial {best.number} with {score.metric} {best.values[0]:.4f}" if best else ""
        raise OneCycleError(f"--target {target:g}: no complete trial of study {study.study_name} reached "
                            f"{score.metric} {'>=' if score.maximize else '<='} {target:g} "
                            f"({len(complete)} complete){best_txt}; nothing written")
    cost_goal = goals_[1] if len(goals_) > 1 else Goal(DEFAULT_COST, "minimize", None)
    sign = -1.0 if cost_goal.maximize else 1.0
    return min(costed, key=lambda tc: (sign * tc[1], -(1.0 if score.maximize else -1.0) * tc[0].values[0],
                                       tc[0].number))[0]


def describe(goals_: list[Goal], values: list[float] | None) -> str:
    """``val/top1 0.9012, train/seconds 41.2``."""
    if values is None:
        return ""
    return ", ".join(f"{g.metric} {_fmt(g, v)}" for g, v in zip(goals_, values, strict=True))


def _fmt(goal: Goal, value: float) -> str:
    if goal.metric == "train/seconds":
        return f"{value:.1f}"
    if goal.is_cost:
        return f"{value:.0f}"
    return f"{value:.4f}"
