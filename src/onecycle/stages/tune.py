"""tune stage: an Optuna study over the One Cycle schedule, each trial a real (shortened) training.

A trial is ``params`` with the sampled values applied and ``train.epochs = tune.epochs`` (unless
``train.epochs`` is itself in the search space), trained by :func:`onecycle.training.loop.fit` on the same
:func:`onecycle.training.engine.build_setup` as ``onecycle train``, without checkpoints. Its value is the best
per-epoch ``tune.metric`` on the validation split (in ``tune.direction``), the same model selection
``train`` uses; the test split is never touched. Every epoch's value is reported to Optuna, and the
pruner may stop the trial (``PRUNED``); a trial whose loss diverges is recorded as ``PRUNED`` too, with
the reason in its user attrs, and the study goes on.

The study lives in ``tune.storage``: by default the journal file ``reports/tune/study.journal``, safe
for several worker processes on one machine; any Optuna RDB URL (``sqlite:///...``,
``postgresql://...``) for many machines; ``$OPTUNA_STORAGE``, when set, overrides ``tune.storage`` (as for
the ``optuna`` CLI). The study's value is named ``tune.metric``. Re-running resumes the study (``--n-trials`` counts the trials
of this process). MLflow gets one parent run per study (its id is a study user attr, so a resumed
study and every worker log under the same parent) and one nested run per trial. Each trial records
``dvc exp run -S ...``, the command that re-runs it as a DVC experiment (user attr and trials.csv column
``dvc_command``, tag of its run); the parent run and best_params.yaml get the best max_lr over each
LR-finder suggestion (``best/max_lr_over_<suggestion>``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onecycle.core.errors import ConfigError, OneCycleError
from onecycle.core.files import atomic_write_text
from onecycle.core.paths import Workspace
from onecycle.data.loaders import SPLIT_SEED
from onecycle.stages.command import run_command
from onecycle.tracking import runs, store
from onecycle.training.loop import FitHooks, Interrupted, config_hash, fit
from onecycle.training.lr_report import resolve_max_lr
from onecycle.training.records import METRIC_KEYS
from onecycle.training.schedule import check_fits
from onecycle.training.suggest import SUGGESTERS
from onecycle.tuning.params_edit import apply_best
from onecycle.tuning.plots import write_plots
from onecycle.tuning.reproduce import check_fixed, dvc_command, fixed_params, trial_sets
from onecycle.tuning.space import Dimension, search_space, trial_params
from onecycle.tuning.studies import (
    StopOnSignal,
    build_pruner,
    fail_dead_trials,
    open_storage,
    open_study,
    pruner_cannot_prune,
    record_worker,
    running_elsewhere,
    sigterm_interrupts,
    storage_url,
)

log = logging.getLogger(__name__)

# Study user attrs.
PARENT_RUN_ATTR = "mlflow_parent_run_id"
# Trial user attr (a trials.csv column) and nested-run tag: the command that re-runs the trial as a DVC experiment.
DVC_COMMAND_ATTR = "dvc_command"
MAX_LR_KEY = "schedule.max_lr"


def suggestion_ratios(best_max_lr: float, lr_find_json: Path) -> dict[str, float]:
    """``best max_lr / suggestion`` for each LR-finder suggestion in ``reports/lr_find.json`` (none there: {})."""
    import json

    try:
        suggestions = json.loads(Path(lr_find_json).read_text()).get("suggestions") or {}
    except (OSError, ValueError):
        return {}
    return {name: best_max_lr / suggestions[name] for name in SUGGESTERS if suggestions.get(name)}


class _InvalidTrialError(ConfigError):
    """The sampled values do not make a valid configuration together (the trial is FAIL, the study goes on)."""


def metric_column(params) -> str:
    """The history row key (``val_top1``) of ``tune.metric`` (``val/top1``); ConfigError naming tune.metric."""
    by_name = {name: column for column, name in METRIC_KEYS.items()}
    metric = params.tune.metric
    column = by_name.get(metric) or (metric if metric in METRIC_KEYS else None)
    if column is None:
        raise ConfigError(f"tune.metric must be one of {', '.join(by_name)}; got {metric!r}")
    if column.startswith("val_") and params.data.val_size == 0:
        raise ConfigError(f"tune.metric {metric} needs a validation split, but data.val_size is 0")
    if "loss" in column and params.tune.direction == "maximize":
        log.warning("tune.metric is %s and tune.direction is maximize: the study looks for the highest loss", metric)
    return column


# ------------------------------------------------------------------------------------------- MLflow

def parent_run(study, created: bool, experiment_id: str, tags: dict[str, str],
               wait_s: float = 30.0) -> tuple[str, bool]:
    """``(run_id, new)``: the study's MLflow parent run, created and recorded in the study if it has none.

    A worker that joins a study another worker has just created waits (up to ``wait_s``) for that worker
    to record its parent run, so that both log under one parent.
    """
    client = store.mlflow().MlflowClient()
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    deadline = time.monotonic() + (0 if created else wait_s)
    while run_id is None and time.monotonic() < deadline:
        time.sleep(0.5)
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id is not None:
        try:
            info = client.get_run(run_id).info
            if info.lifecycle_stage == "active" and info.experiment_id == experiment_id:
                return run_id, False
        except Exception:  # not in this tracking store (MLFLOW_TRACKING_URI changed)
            pass
        log.warning("the study's MLflow parent run %s is not in this tracking store and experiment (or was "
                    "deleted); starting a new one", run_id)
    run = client.create_run(experiment_id, run_name=f"tune:{study.study_name}", tags=tags)
    study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
    return run.info.run_id, True


def _quietly(what: str, fn: Callable[[], Any]) -> None:
    """MLflow calls whose failure must not end a study (the store may be locked by another worker)."""
    try:
        fn()
    except Exception as exc:
        log.warning("MLflow: could not %s (%s)", what, " ".join(str(exc).split())[:160])


class Objective:
    """One trial: sample, build the trial's params, train with ``fit``, report each epoch, log a nested run."""

    def __init__(self, params, space: dict[str, Dimension], column: str, tags: dict[str, str], ws: Workspace,
                 step_fn: Callable, repo_flat: dict[str, Any] | None, stop: StopOnSignal | None = None):
        self.params, self.space, self.column, self.tags, self.ws = params, space, column, tags, ws
        self.step_fn, self.stop = step_fn, stop or StopOnSignal()
        self.repo_flat = repo_flat  # the repo's params.yaml, flat: what a trial's command must change
        self.metric = params.tune.metric
        self.maximize = params.tune.direction == "maximize"

    def __call__(self, trial) -> float:
        import optuna

        from onecycle.training.engine import DivergenceError, build_setup

        mlflow = store.mlflow()
        self.stop.check()  # stopped between two trials: start none
        record_worker(trial)  # first: a worker killed from here on is found by the next one (fail_dead_trials)
        values = {key: dim.suggest(trial) for key, dim in self.space.items()}
        run = mlflow.start_run(nested=True, run_name=f"trial-{trial.number}")
        run_id = run.info.run_id
        logger = runs.RunLogger(run_id)
        state, status = "FAIL", "FAILED"
        try:
            trial.set_user_attr("mlflow_run_id", run_id)
            mlflow.set_tags({**self.tags, "stage": "tune_trial", "trial_number": str(trial.number), "state": "RUNNING"})
            try:
                tparams = trial_params(self.params, values)
            except ConfigError as exc:
                msg = f"trial {trial.number}: the sampled values do not fit together: {exc}"
                raise _InvalidTrialError(msg) from None
            max_lr = resolve_max_lr(tparams.schedule.max_lr, self.ws.lr_find_json)
            command = dvc_command(trial_sets(tparams.flat(), values, self.repo_flat))
            trial.set_user_attr(DVC_COMMAND_ATTR, command)
            mlflow.set_tag(DVC_COMMAND_ATTR, command)
            runs.log_params_flat(runs.params_with_max_lr(tparams.flat(), max_lr))
            runs.log_datasets(runs.datasets(tparams.data, self.ws.root, ["train", "val"], split_seed=SPLIT_SEED))
            mlflow.set_tag("config_hash", config_hash(tparams.flat(), max_lr))
            setup = build_setup(tparams.data, tparams.augment, tparams.model, tparams.train, root=self.ws.root)
            try:
                check_fits(tparams.schedule, tparams.train.epochs, len(setup.train_loader))
            except ConfigError as exc:
                raise _InvalidTrialError(f"trial {trial.number}: {exc}") from None
            self.stop.check()  # a signal during the trial's setup
            result = fit(setup, max_lr, train=tparams.train, schedule=tparams.schedule, optimizer=tparams.optimizer,
                         hooks=FitHooks(on_epoch=self._on_epoch(trial, tparams.train.epochs, logger)),
                         should_stop=self.stop, step_fn=self.step_fn)  # stops between two steps (Interrupted)
            seen = [row[self.column] for row in result.history
                    if row.get(self.column) is not None and math.isfinite(row[self.column])]
            if not seen:
                raise _InvalidTrialError(f"trial {trial.number}: no finite {self.metric} to report")
            value = float(max(seen) if self.maximize else min(seen))
            mlflow.log_metric("objective", value)
            state, status = "COMPLETE", "FINISHED"
            return value
        except optuna.TrialPruned:
            state, status = "PRUNED", "FINISHED"
            raise
        except DivergenceError as exc:
            state = "PRUNED"  # the run stays FAILED, as a diverged training does
            reason = str(exc)
            trial.set_user_attr("diverged", reason)
            _quietly("tag the failure", lambda: mlflow.set_tag("failure_reason", reason))
            raise optuna.TrialPruned(f"diverged: {reason}") from None
        except _InvalidTrialError as exc:
            reason = str(exc)
            trial.set_user_attr("failure_reason", reason)
            _quietly("tag the failure", lambda: mlflow.set_tag("failure_reason", reason))
            raise
        except (KeyboardInterrupt, Interrupted):
            status = "KILLED"
            raise KeyboardInterrupt from None
        finally:
            logger.flush()
            _quietly("tag the trial's state", lambda: mlflow.set_tag("state", state))
            mlflow.end_run(status=status)

    def _on_epoch(self, trial, epochs: int, logger: runs.RunLogger) -> Callable[[int, dict, list, list], None]:
        """Log the epoch to the trial's run, report it to Optuna, prune if the pruner says so."""
        import optuna

        def on_epoch(epoch: int, row: dict, steps: list, history: list) -> None:
            runs.log_epoch(logger, row, steps)
            value = row.get(self.column)
            if value is None or not math.isfinite(value):
                return
            trial.report(float(value), epoch)
            # After the last epoch the trial is done: it completes rather than being pruned.
            if epoch + 1 < epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: {self.metric} {value:.4f}")

        return on_epoch


def _after_trial(metric: str):
    def callback(study, trial) -> None:
        from optuna.trial import TrialState

        mlflow = store.mlflow()

        value = f" {metric} {trial.value:.4f}" if trial.state == TrialState.COMPLETE else ""
        reason = trial.user_attrs.get("diverged") or trial.user_attrs.get("failure_reason")
        shown = ", ".join(f"{k.split('.', 1)[1]} {_fmt(v)}" for k, v in trial.params.items())
        best = _best_trial(study)
        best_txt = f"; best: trial {best.number} ({best.value:.4f})" if best is not None else ""
        print(f"tune: trial {trial.number} {trial.state.name}{value} ({shown}){' - ' + reason if reason else ''}"
              f"{best_txt}", flush=True)
        if trial.state == TrialState.COMPLETE:
            _quietly("log the trial's value", lambda: mlflow.log_metric("trial/value", trial.value, step=trial.number))

    return callback


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _best_trial(study):
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


# ------------------------------------------------------------------------------------------ outputs

def _rounded(value: Any) -> Any:
    """Best values to 4 significant digits: more is noise, and they are pasted into params.yaml."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def best_values(params, trial) -> dict[str, Any]:
    """The best trial's sampled values (dotted keys), rounded where that keeps them valid."""
    exact = dict(trial.params)
    rounded = {k: _rounded(v) for k, v in exact.items()}
    try:
        trial_params(params, rounded)
        return rounded
    except ConfigError:
        return exact


def best_params_text(params, values: dict[str, Any], study, metric: str) -> str:
    """reports/tune/best_params.yaml: the schedule section (and every other tuned section), whole, with the
    best values applied, ready to paste into params.yaml."""
    import yaml

    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, field = key.split(".", 1)
        sections.setdefault(section, {})[field] = value
    best = params.replace(**sections)
    out = {"schedule": best.schedule.model_dump(mode="json")}
    for section in sorted(set(sections) - {"schedule"}):
        out[section] = getattr(best, section).model_dump(mode="json")
    trial = study.best_trial
    n_complete = sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))
    epochs = "" if "train.epochs" in values else f" after {_count(params.tune.epochs, 'epoch')}"
    header = (f"# Best of Optuna study {study.study_name}: trial {trial.number}, {metric} {trial.value:.4f}{epochs} "
              f"(best of {_count(n_complete, 'complete trial')}).\n"
              f"# Tuned keys: {', '.join(values)}. Paste over these sections of params.yaml,\n"
              "# or run `onecycle tune --n-trials 0 --apply` to write just the tuned keys into it.\n")
    return header + yaml.safe_dump(out, sort_keys=False)


# ------------------------------------------------------------------------------------------- the stage

def _add_args(parser) -> None:
    def non_negative(v: str) -> int:
        n = int(v)
        if n < 0:
            raise ValueError(v)
        return n

    def positive(v: str) -> float:
        x = float(v)
        if not x > 0:
            raise ValueError(v)
        return x

    parser.add_argument("--n-trials", type=non_negative, default=None, metavar="N",
                        help="trials to run in this process (default: tune.n_trials; 0 = only write the reports)")
    parser.add_argument("--timeout", type=positive, default=None, metavar="S",
                        help="start no new trial after S seconds (the running one finishes)")
    parser.add_argument("--threads", type=non_negative, default=None, metavar="N",
                        help="torch threads of this worker (overrides train.threads; see README: Tuning)")
    parser.add_argument("--apply", action="store_true",
                        help="write the best trial's values into the params file (only those keys; comments kept)")
    parser.add_argument("--force", action="store_true",
                        help="join the study even if it holds other params fixed (its trials become incomparable)")


def run(params, ws: Workspace, *, n_trials: int | None = None, timeout: float | None = None,
        threads: int | None = None, apply_to: Path | None = None, step_fn: Callable | None = None,
        force: bool = False) -> int:
    """The tune command in ``ws``: open or resume the study, run ``n_trials`` trials (default ``tune.n_trials``),
    write reports/tune/, and with ``apply_to`` write the best values into that params file.

    ``step_fn`` (one optimizer step, ``engine.train_step`` by default) is the seam tests inject faults through.
    """
    from onecycle.training.engine import device_name, resolve_device, train_step

    mlflow = store.mlflow()

    logging.getLogger("optuna").setLevel(logging.WARNING)
    tune = params.tune
    if threads is not None:
        params = params.replace(train={"threads": threads})
    n_trials = tune.n_trials if n_trials is None else n_trials
    column = metric_column(params)
    space = search_space(params, ws.lr_find_json)
    try:
        unsampled = trial_params(params, {})
    except ConfigError as exc:
        raise ConfigError(f"tune.epochs ({tune.epochs}) does not fit the other params: {exc}") from None
    url, source = storage_url(params)
    storage, where = open_storage(url, ws.journal, key=source)
    experiment_id = store.configure(params.mlflow.experiment, ws.root)
    study, created = open_study(storage, params)
    check_fixed(study, fixed_params(unsampled.flat(), set(space)), force)
    for dead, note in fail_dead_trials(study):  # its worker died on this machine (kill -9): FAIL, its run KILLED
        print(f"tune: {note}", flush=True)
        run_id = dead.user_attrs.get("mlflow_run_id")
        _quietly("end its run", lambda r=run_id: r and mlflow.MlflowClient().set_terminated(r, "KILLED"))
    study.pruner = build_pruner(params, space)
    cannot = pruner_cannot_prune(params, space)
    if n_trials and cannot:
        log.warning("%s", cannot)
    tags = {**runs.provenance_tags(params.data.dataset, device_name(resolve_device(params.train.device)), ws.root),
            "optuna_study": tune.study_name, "optuna_storage": where}
    parent_id, new_parent = parent_run(study, created, experiment_id, {**tags, "stage": "tune"})
    before = study.get_trials(deepcopy=False)
    running = running_elsewhere(before)
    if running and params.train.threads == 0:
        log.warning("%d trial(s) of this study are running in other workers: give each worker its share of the "
                    "cores (--threads N or train.threads; see README: Tuning)", running)
    print(f"tune: study {tune.study_name} in {where}{' ($OPTUNA_STORAGE)' if source != 'tune.storage' else ''} "
          f"({_count(len(before), 'trial')} so far); "
          f"{_count(n_trials, 'trial')} of {_count(tune.epochs, 'epoch')} here, {tune.sampler} sampler, "
          f"{tune.pruner} pruner, {tune.direction} {tune.metric}; "
          f"space: {'; '.join(d.describe() for d in space.values())}; MLflow parent run {parent_id}", flush=True)
    with mlflow.start_run(run_id=parent_id):
        if new_parent:
            _quietly("log the study's params", lambda: runs.log_params_flat(params.flat()))
        if n_trials:
            with sigterm_interrupts() as stop:
                study.optimize(Objective(params, space, column, tags, ws, step_fn or train_step, _repo_params(ws), stop),
                               n_trials=n_trials,
                               timeout=timeout, catch=(_InvalidTrialError,), callbacks=[_after_trial(tune.metric)],
                               gc_after_trial=True)
        values = _report(study, params, where, ws)
    if apply_to is not None:
        if values is None:
            raise OneCycleError(f"--apply: study {tune.study_name} has no complete trial yet")
        changed = apply_best(Path(apply_to), values)
        print(f"tune: --apply wrote {len(changed)} key(s) into {apply_to}"
              + (": " + "; ".join(changed) if changed else " (already the best values)"))
    return 0


def _report(study, params, where: str, ws: Workspace) -> dict[str, Any] | None:
    """Write reports/tune/ (trials.csv, plots, best_params.yaml) and the parent run's summary; the best values."""
    mlflow = store.mlflow()

    metric = params.tune.metric
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    ws.tune_dir.mkdir(parents=True, exist_ok=True)
    if trials:
        atomic_write_text(ws.trials_csv, study.trials_dataframe().to_csv(index=False))
    plots = write_plots(study, metric, ws.tune_dir)
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    best = _best_trial(study)
    if best is None:
        print(f"tune: study {study.study_name} in {where}: {len(trials)} trials ({summary or 'none'}); "
              f"no complete trial yet, so no {ws.best_params}")
        return None
    values = best_values(params, best)
    ratios = _best_over_suggestions(best, ws)
    atomic_write_text(ws.best_params, best_params_text(params, values, study, metric) + _ratios_text(ratios, ws))

    def log_summary() -> None:
        mlflow.log_metric("best/value", best.value, step=len(trials))
        mlflow.set_tags({"best_trial": str(best.number), "best_value": f"{best.value:.6g}",
                         "best_mlflow_run_id": best.user_attrs.get("mlflow_run_id", ""),
                         **{f"best.{k}": str(v) for k, v in values.items()}})
        if ratios:
            mlflow.log_metrics({f"best/max_lr_over_{name}": r for name, r in ratios.items()})
        mlflow.log_dict({"trial": best.number, "value": best.value, "params": values}, "tune/best.json")
        for path in (ws.best_params, ws.trials_csv, *plots):
            runs.log_artifact(path, "tune")

    _quietly("log the study's summary", log_summary)
    shown = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items())
    if ratios:
        print("tune: best max_lr / LR finder suggestion: " + ", ".join(f"{k} {v:.3g}x" for k, v in ratios.items()))
    print(f"tune: study {study.study_name} in {where}: {len(trials)} trials ({summary}); best trial {best.number}: "
          f"{metric} {best.value:.4f} with {shown} -> {ws.best_params}, {len(plots)} plots in {ws.tune_dir}/")
    return values


def _repo_params(ws: Workspace) -> dict[str, Any] | None:
    """The repo's params.yaml (what ``dvc exp run -S`` edits), flat; None when it cannot be read."""
    from onecycle.config import load_params

    try:
        return load_params(ws.params).flat()
    except ConfigError as exc:
        log.warning("the trials' dvc exp run commands name only the sampled values: %s", exc)
        return None


def _best_over_suggestions(best, ws: Workspace) -> dict[str, float]:
    """The best trial's max_lr over each suggestion of the LR range test (reports/lr_find.json) on the same
    data and model: which suggestion to trust. {} when the study did not tune max_lr or there is no report."""
    if MAX_LR_KEY not in best.params:
        return {}
    return suggestion_ratios(float(best.params[MAX_LR_KEY]), ws.lr_find_json)


def _ratios_text(ratios: dict[str, float], ws: Workspace) -> str:
    if not ratios:
        return ""
    shown = ", ".join(f"{name} {r:.3g}" for name, r in ratios.items())
    return (f"# best max_lr / each LR finder suggestion in {ws.lr_find_json} (same data and model): {shown}\n"
            "# (1 = that suggestion was the best peak LR; see README: Tuning)\n")


def main(argv=None) -> int:
    def body(params, args) -> int:
        return run(params, Workspace(), n_trials=args.n_trials, timeout=args.timeout, threads=args.threads,
                   apply_to=Path(args.params) if args.apply else None, force=args.force)

    return run_command("tune", __doc__.splitlines()[0], argv, body, add_args=_add_args)


if __name__ == "__main__":
    raise SystemExit(main())
