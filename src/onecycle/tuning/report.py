"""A study's outputs: reports/tune/ (trials.csv, plots, best_params.yaml ready to paste into params.yaml; with
several objectives the Pareto front as pareto.csv, a DVC plot, and pareto.png), the best values rounded where that
keeps them valid, the best max_lr over each LR-finder suggestion, and the parent run's summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onecycle.core.errors import ConfigError
from onecycle.core.files import atomic_write_text
from onecycle.core.paths import Workspace
from onecycle.tracking import study_runs
from onecycle.training.suggest import SUGGESTERS
from onecycle.tuning.objective import DVC_COMMAND_ATTR, count, fmt
from onecycle.tuning.objectives import Goal, best_scoring, describe, front
from onecycle.tuning.plots import plot_front, write_plots
from onecycle.tuning.space import trial_params

MAX_LR_KEY = "schedule.max_lr"
# reports/tune/: a multi-objective study's Pareto front (dvc.yaml's "Pareto front" plot reads the CSV)
PARETO_CSV, PARETO_PNG = "pareto.csv", "pareto.png"


def suggestion_ratios(best_max_lr: float, lr_find_json: Path) -> dict[str, float]:
    """``best max_lr / suggestion`` for each LR-finder suggestion in ``reports/lr_find.json`` (none there: {})."""
    import json

    try:
        suggestions = json.loads(Path(lr_find_json).read_text()).get("suggestions") or {}
    except (OSError, ValueError):
        return {}
    return {name: best_max_lr / suggestions[name] for name in SUGGESTERS if suggestions.get(name)}


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


def best_params_text(params, values: dict[str, Any], study, trial, goals: list[Goal]) -> str:
    """reports/tune/best_params.yaml: the schedule section (and every other tuned section), whole, with the
    values of ``trial`` (the best, or the front's best score) applied, ready to paste into params.yaml."""
    import yaml

    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, field = key.split(".", 1)
        sections.setdefault(section, {})[field] = value
    best = params.replace(**sections)
    out = {"schedule": best.schedule.model_dump(mode="json")}
    for section in sorted(set(sections) - {"schedule"}):
        out[section] = getattr(best, section).model_dump(mode="json")
    n_complete = sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))
    epochs = "" if "train.epochs" in values else f" after {count(params.tune.epochs, 'epoch')}"
    which = "Best" if len(goals) == 1 else f"Best {goals[0].metric} on the Pareto front"
    header = (f"# {which} of Optuna study {study.study_name}: trial {trial.number}, {describe(goals, trial.values)}"
              f"{epochs} (of {count(n_complete, 'complete trial')}).\n"
              f"# Tuned keys: {', '.join(values)}. Paste over these sections of params.yaml,\n"
              "# or run `onecycle tune --n-trials 0 --apply` to write just the tuned keys into it.\n")
    return header + yaml.safe_dump(out, sort_keys=False)


def write_report(study, params, goals: list[Goal], where: str, ws: Workspace):
    """Write reports/tune/ (trials.csv, plots, best_params.yaml; the Pareto front with several goals) and the parent
    run's summary; the best trial (several goals: the front's best score), None before any completed."""
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    ws.tune_dir.mkdir(parents=True, exist_ok=True)
    if trials:
        atomic_write_text(ws.trials_csv, study.trials_dataframe().to_csv(index=False))
    plots = write_plots(study, goals[0].metric, ws.tune_dir)
    plots += _write_front(study, goals, ws, len(trials))
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    best = best_scoring(study, goals)
    if best is None:
        print(f"tune: study {study.study_name} in {where}: {len(trials)} trials ({summary or 'none'}); "
              f"no complete trial yet, so no {ws.best_params}")
        return None
    values = best_values(params, best)
    ratios = _best_over_suggestions(best, ws)
    atomic_write_text(ws.best_params, best_params_text(params, values, study, best, goals) + _ratios_text(ratios, ws))

    study_runs.log_study_summary(best, values, len(trials), ratios, [ws.best_params, ws.trials_csv, *plots])
    shown = ", ".join(f"{k} {fmt(v)}" for k, v in values.items())
    if ratios:
        print("tune: best max_lr / LR finder suggestion: " + ", ".join(f"{k} {v:.3g}x" for k, v in ratios.items()))
    which = "best" if len(goals) == 1 else \
        f"Pareto front of {count(len(front(study)), 'trial')}, best {goals[0].metric}:"
    print(f"tune: study {study.study_name} in {where}: {len(trials)} trials ({summary}); {which} trial {best.number}: "
          f"{describe(goals, best.values)} with {shown} -> {ws.best_params}, {len(plots)} plots in {ws.tune_dir}/")
    return best


def front_table(study, goals: list[Goal]) -> tuple[list[str], list[list[Any]]]:
    """``(columns, rows)`` of the Pareto front, cheapest first: ``trial``, ``score`` (the first goal), ``cost`` (the
    second), every goal by its label (``val_top1``), the searched values, the trial's ``dvc exp run`` command."""
    trials = front(study)
    keys = sorted({k for t in trials for k in t.params})
    sign = 1.0 if goals[1].maximize else -1.0
    trials.sort(key=lambda t: (-sign * t.values[1], t.number))
    columns = ["trial", "score", "cost", *(g.label for g in goals), *keys, DVC_COMMAND_ATTR]
    rows = [[t.number, t.values[0], t.values[1], *t.values, *(t.params.get(k) for k in keys),
             t.user_attrs.get(DVC_COMMAND_ATTR, "")] for t in trials]
    return columns, rows


def _write_front(study, goals: list[Goal], ws: Workspace, n_trials: int) -> list[Path]:
    """Several goals: reports/tune/pareto.csv (a DVC plot: score against cost) and pareto.png, and the front on the
    parent run; [] with one goal (a front from another study is removed)."""
    import csv
    import io

    csv_path, png_path = ws.tune_dir / PARETO_CSV, ws.tune_dir / PARETO_PNG
    if len(goals) == 1:
        for stale in (csv_path, png_path):
            stale.unlink(missing_ok=True)
        return []
    columns, rows = front_table(study, goals)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    atomic_write_text(csv_path, buf.getvalue())
    study_runs.log_front(columns, rows, n_trials)
    written = [csv_path]
    if rows:
        plot_front(study, goals, png_path)
        written.append(png_path)
    return written


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
            "# (1 = that suggestion was the best peak LR; docs: how-to/tuning)\n")


