"""tune stage: an Optuna study over the schedule (or any params), each trial a real (shortened) training.

A trial is ``params`` with the sampled values applied and ``train.epochs = tune.epochs`` (unless
``train.epochs`` is itself in the search space), trained by :func:`onecycle.training.loop.fit` on the same
:func:`onecycle.training.engine.build_setup` as ``onecycle train``, without checkpoints. Its value is the best
per-epoch ``tune.metric`` on the validation split (in ``tune.direction``), the same model selection
``train`` uses; the test split is never touched. Every epoch's value is reported to Optuna, and the
pruner may stop the trial (``PRUNED``); a trial whose loss diverges is recorded as ``PRUNED`` too, with
the reason in its user attrs, and the study goes on. ``tune.metric`` may be a list, e.g. ``[val/top1,
train/seconds]``: a multi-objective study whose Pareto front the reports, MLflow and a DVC plot show, no trial
pruned (:mod:`onecycle.tuning.objectives`); ``--apply --target T`` writes the cheapest trial that reached T.
``-S key=value`` overrides the loaded params as ``dvc exp run -S`` does (:mod:`onecycle.tuning.overrides`).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onecycle.core.errors import ConfigError
from onecycle.core.paths import Workspace
from onecycle.stages.command import run_command
from onecycle.tracking import runs, store, study_runs
from onecycle.tuning.objective import InvalidTrialError, Objective, after_trial, count
from onecycle.tuning.objectives import goals as objective_goals
from onecycle.tuning.overrides import apply_sets, parse_sets
from onecycle.tuning.params_edit import apply_chosen
from onecycle.tuning.report import write_report
from onecycle.tuning.reproduce import check_fixed, fixed_params
from onecycle.tuning.space import search_space, trial_params
from onecycle.tuning.studies import (
    build_pruner,
    fail_dead_trials,
    open_storage,
    open_study,
    pruner_cannot_prune,
    repair_journal,
    running_elsewhere,
    sigterm_interrupts,
    storage_url,
    study_deleted_is_one_line,
)

log = logging.getLogger(__name__)


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
                        help="torch threads of this worker (overrides train.threads; docs: how-to/tuning)")
    parser.add_argument("--apply", action="store_true",
                        help="write the best trial's values into the params file (only those keys; comments kept); "
                             "several objectives: the best score on the Pareto front, with its epochs")

    def finite(v: str) -> float:
        x = float(v)
        if not math.isfinite(x):
            raise ValueError(v)
        return x

    parser.add_argument("--target", type=finite, default=None, metavar="SCORE",
                        help="with --apply: write the cheapest trial (by the second objective; one objective: by its "
                             "training seconds) whose score (the first) reached SCORE, e.g. --target 0.93")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param as dvc exp run -S does (repeatable), e.g. -S tune.n_trials=4")
    parser.add_argument("--force", action="store_true",
                        help="join the study even if it holds other params fixed (its trials become incomparable)")
    parser.add_argument("--repair-journal", action="store_true",
                        help="mend a damaged journal file (a worker killed mid-write): keep every complete record and "
                             "a copy of the file beside it, then exit")


def run(params, ws: Workspace, *, n_trials: int | None = None, timeout: float | None = None,
        threads: int | None = None, apply_to: Path | None = None, step_fn: Callable | None = None,
        force: bool = False, target: float | None = None) -> int:
    """The tune command in ``ws``: open or resume the study, run ``n_trials`` trials (default ``tune.n_trials``),
    write reports/tune/, and with ``apply_to`` write the best trial's values into that params file (with ``target``:
    the cheapest trial whose score reached it).

    ``step_fn`` (one optimizer step, ``engine.train_step`` by default) is the seam tests inject faults through.
    """
    from onecycle.training.engine import device_name, resolve_device, train_step

    logging.getLogger("optuna").setLevel(logging.WARNING)
    tune = params.tune
    if threads is not None:
        params = params.replace(train={"threads": threads})
    n_trials = tune.n_trials if n_trials is None else n_trials
    goals = objective_goals(tune, params.data.val_size)
    space = search_space(params, ws.lr_find_json)  # the study's own params are checked before the data is read
    params = params.for_data(ws.root)  # data.val_size, data.batch_size: the counts the trials record and use
    try:
        unsampled = trial_params(params, {})
    except ConfigError as exc:
        raise ConfigError(f"tune.epochs ({tune.epochs}) does not fit the other params: {exc}") from None
    url, source = storage_url(params)
    storage, where = open_storage(url, ws.journal, key=source)
    experiment_id = store.configure(params.mlflow.experiment, ws.root)
    study, created = open_study(storage, params)
    check_fixed(study, storage, fixed_params(unsampled.flat(), set(space)), force)
    for dead, note in fail_dead_trials(study):  # its worker died on this machine (kill -9): FAIL, its run KILLED
        print(f"tune: {note}", flush=True)
        study_runs.end_killed(dead.user_attrs.get("mlflow_run_id"))
    study.pruner = build_pruner(params, space)
    cannot = pruner_cannot_prune(params, space)
    if n_trials and cannot:
        log.warning("%s", cannot)
    tags = {**runs.provenance_tags(params.data.dataset, device_name(resolve_device(params.train.device)), ws.root),
            "optuna_study": tune.study_name, "optuna_storage": where}
    parent_id, new_parent = study_runs.parent_run(study, created, experiment_id, {**tags, "stage": "tune"})
    before = study.get_trials(deepcopy=False)
    running = running_elsewhere(before)
    if running and params.train.threads == 0:
        log.warning("%d trial(s) of this study are running in other workers: give each worker its share of the "
                    "cores (--threads N or train.threads; docs: how-to/tuning)", running)
    print(f"tune: study {tune.study_name} in {where}{' ($OPTUNA_STORAGE)' if source != 'tune.storage' else ''} "
          f"({count(len(before), 'trial')} so far); "
          f"{count(n_trials, 'trial')} of {_epochs(tune.epochs, space)} here, {tune.sampler} sampler, "
          f"{tune.pruner if len(goals) == 1 else 'no'} pruner, "
          f"{', '.join(f'{g.direction} {g.metric}' for g in goals)}; "
          f"space: {'; '.join(d.describe() for d in space.values())}; MLflow parent run {parent_id}", flush=True)
    with study_runs.continue_run(parent_id):
        if new_parent:
            study_runs.log_study_params(params.flat())
        if n_trials:
            with sigterm_interrupts() as stop:
                study.optimize(Objective(params, space, goals, tags, ws, step_fn or train_step, _repo_params(ws), stop),
                               n_trials=n_trials, timeout=timeout, catch=(InvalidTrialError,),
                               callbacks=[after_trial(goals)], gc_after_trial=True)
        write_report(study, params, goals, where, ws)
    if apply_to is not None:
        print(f"tune: {apply_chosen(study, params, goals, Path(apply_to), target)}")
    return 0


def _epochs(epochs: int, space: dict) -> str:
    """``2 epochs``, or the searched range ``1-4 epochs``."""
    dim = space.get("train.epochs")
    if dim is None:
        return count(epochs, "epoch")
    if dim.kind == "categorical":
        return f"{'/'.join(str(c) for c in dim.choices)} epochs"
    return f"{dim.low}-{dim.high} epochs"


def _repo_params(ws: Workspace) -> dict[str, Any] | None:
    """The repo's params.yaml (what ``dvc exp run -S`` edits), flat; None when it cannot be read."""
    from onecycle.config import load_params

    try:
        return load_params(ws.params).for_data(ws.root, note=False).flat()
    except ConfigError as exc:
        log.warning("the trials' dvc exp run commands name only the sampled values: %s", exc)
        return None


def main(argv=None) -> int:
    def body(params, args) -> int:
        params = apply_sets(params, parse_sets(args.set))
        if args.target is not None and not args.apply:
            raise ConfigError(f"--target {args.target:g} picks the trial that --apply writes: add --apply")
        if args.repair_journal:
            print(f"tune: {repair_journal(params, Workspace().journal)}")
            return 0
        with study_deleted_is_one_line(params, Workspace().journal):
            return run(params, Workspace(), n_trials=args.n_trials, timeout=args.timeout, threads=args.threads,
                       apply_to=Path(args.params) if args.apply else None, force=args.force, target=args.target)

    return run_command("tune", __doc__.splitlines()[0], argv, body, add_args=_add_args)


if __name__ == "__main__":
    raise SystemExit(main())
