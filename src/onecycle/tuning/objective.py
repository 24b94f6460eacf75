"""One Optuna trial of a study: the sampled values applied to the params, a real (shortened) training through the
tracked fit train uses (:mod:`onecycle.tracking.training_run`), each epoch reported to Optuna for pruning (a
single-objective study), its value for each goal (:mod:`onecycle.tuning.objectives`) and its costs recorded, and a
nested MLflow run. A trial whose values do not fit together FAILs and one that diverges is PRUNED; the study goes on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from onecycle.core.errors import ConfigError
from onecycle.core.paths import Workspace
from onecycle.tracking import runs, study_runs, training_run
from onecycle.training.loop import FitHooks, Interrupted, StopSignals, fit
from onecycle.training.lr_report import resolve_max_lr
from onecycle.training.schedule import ScheduleTooShortError
from onecycle.tuning.objectives import COST_ATTRS, Goal, best_scoring, describe, trial_costs, trial_values
from onecycle.tuning.reproduce import dvc_command, trial_sets
from onecycle.tuning.space import Dimension, trial_params
from onecycle.tuning.studies import record_worker

log = logging.getLogger(__name__)

# Trial user attr (a trials.csv column) and nested-run tag: the command that re-runs the trial as a DVC experiment.
DVC_COMMAND_ATTR = "dvc_command"


class InvalidTrialError(ConfigError):
    """The sampled values do not make a valid configuration together (the trial is FAIL, the study goes on)."""


class Objective:
    """One trial: sample, build the trial's params, train with ``fit``, report each epoch, log a nested run."""

    def __init__(self, params, space: dict[str, Dimension], goals: list[Goal], tags: dict[str, str], ws: Workspace,
                 step_fn: Callable, repo_flat: dict[str, Any] | None, stop: StopSignals | None = None):
        self.params, self.space, self.goals, self.tags, self.ws = params, space, goals, tags, ws
        self.step_fn, self.stop = step_fn, stop or StopSignals()
        self.repo_flat = repo_flat  # the repo's params.yaml, flat: what a trial's command must change
        # Optuna's pruners judge one objective: a trial of a multi-objective study reports no epoch
        self.reports = len(goals) == 1 and not goals[0].is_cost

    def __call__(self, trial) -> float | list[float]:
        import optuna

        from onecycle.training.engine import DivergenceError

        self.stop.check()  # stopped between two trials: start none
        record_worker(trial)  # first: a worker killed from here on is found by the next one (fail_dead_trials)
        values = {key: dim.suggest(trial) for key, dim in self.space.items()}
        run_id = study_runs.start_trial_run(trial.number, self.tags)
        logger = runs.RunLogger(run_id)
        state, status = "FAIL", "FAILED"
        try:
            trial.set_user_attr("mlflow_run_id", run_id)
            try:
                tparams = trial_params(self.params, values)
            except ConfigError as exc:
                msg = f"trial {trial.number}: the sampled values do not fit together: {exc}"
                raise InvalidTrialError(msg) from None
            max_lr = resolve_max_lr(tparams.schedule.max_lr, self.ws.lr_find_json)
            command = dvc_command(trial_sets(tparams.flat(), values, self.repo_flat))
            trial.set_user_attr(DVC_COMMAND_ATTR, command)
            study_runs.set_tag(DVC_COMMAND_ATTR, command)
            training_run.record_config(tparams, max_lr, training_run.run_datasets(tparams, self.ws.root))
            try:
                setup = training_run.prepare(tparams, self.ws.root)
            except ScheduleTooShortError as exc:
                raise InvalidTrialError(f"trial {trial.number}: {exc}") from None
            self.stop.check()  # a signal during the trial's setup
            result = fit(setup, max_lr, train=tparams.train, schedule=tparams.schedule, optimizer=tparams.optimizer,
                         hooks=FitHooks(on_epoch=training_run.epoch_logger(logger, self._pruning(trial, tparams.train.epochs))),
                         should_stop=self.stop, step_fn=self.step_fn)  # stops between two steps (Interrupted)
            costs = trial_costs(result.seconds, tparams.train.epochs, len(setup.train_loader.dataset))
            for name, cost in costs.items():
                trial.set_user_attr(COST_ATTRS[name], cost)
            study_runs.log_values(costs)
            values = trial_values(self.goals, result.history, costs)
            if values is None:
                metrics = ", ".join(g.metric for g in self.goals if not g.is_cost)
                raise InvalidTrialError(f"trial {trial.number}: no finite {metrics} to report")
            study_runs.log_value("objective", values[0])
            state, status = "COMPLETE", "FINISHED"
            return values[0] if len(values) == 1 else values
        except optuna.TrialPruned:
            state, status = "PRUNED", "FINISHED"
            raise
        except DivergenceError as exc:
            state = "PRUNED"  # the run stays FAILED, as a diverged training does
            reason = str(exc)
            trial.set_user_attr("diverged", reason)
            study_runs.quietly("tag the failure", lambda: study_runs.set_tag("failure_reason", reason))
            raise optuna.TrialPruned(f"diverged: {reason}") from None
        except InvalidTrialError as exc:
            reason = str(exc)
            trial.set_user_attr("failure_reason", reason)
            study_runs.quietly("tag the failure", lambda: study_runs.set_tag("failure_reason", reason))
            raise
        except (KeyboardInterrupt, Interrupted):
            status = "KILLED"
            raise KeyboardInterrupt from None
        finally:
            logger.flush()
            study_runs.end_trial_run(state, status)

    def _pruning(self, trial, epochs: int) -> Callable[[int, dict, list, list], None]:
        """After each epoch (logged): report it to Optuna, prune if the pruner says so."""
        import optuna

        goal = self.goals[0]

        def on_epoch(epoch: int, row: dict, steps: list, history: list) -> None:
            value = row.get(goal.column) if self.reports else None
            if value is None or not math.isfinite(value):
                return
            trial.report(float(value), epoch)
            # After the last epoch the trial is done: it completes rather than being pruned.
            if epoch + 1 < epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: {goal.metric} {value:.4f}")

        return on_epoch


def after_trial(goals: list[Goal]):
    """An Optuna callback: print each finished trial in one line and log its values to the parent run."""
    def callback(study, trial) -> None:
        from optuna.trial import TrialState

        from onecycle.tuning.objectives import front

        complete = trial.state == TrialState.COMPLETE
        value = f" {describe(goals, trial.values)}" if complete else ""
        reason = trial.user_attrs.get("diverged") or trial.user_attrs.get("failure_reason")
        shown = ", ".join(f"{shown_key(k)} {fmt(v)}" for k, v in trial.params.items())
        best = best_scoring(study, goals)
        best_txt = ""
        if best is not None and len(goals) == 1:
            best_txt = f"; best: trial {best.number} ({best.value:.4f})"
        elif best is not None:
            best_txt = (f"; Pareto front: {count(len(front(study)), 'trial')}, best {goals[0].metric}: trial "
                        f"{best.number} ({describe(goals, best.values)})")
        print(f"tune: trial {trial.number} {trial.state.name}{value} ({shown}){' - ' + reason if reason else ''}"
              f"{best_txt}", flush=True)
        if complete:
            study_runs.quietly("log the trial's values", lambda: study_runs.log_values(
                {"trial/value": trial.values[0], **({"trial/cost": trial.values[1]} if len(goals) > 1 else {})},
                step=trial.number))

    return callback


def shown_key(key: str) -> str:
    """A searched key as a trial's line prints it: a schedule key by its field (``max_lr``), others in full."""
    return key.split(".", 1)[1] if key.startswith("schedule.") else key


def count(n: int, what: str) -> str:
    """``1 trial``, ``3 trials``."""
    return f"{n} {what}{'' if n == 1 else 's'}"


def fmt(v: Any) -> str:
    """A sampled value as printed: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)
