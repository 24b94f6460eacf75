"""The study's PNG plots that ``onecycle tune`` writes after its trials: Optuna's matplotlib visualizations (of the
first objective in a multi-objective study) and the Pareto front (score against cost)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onecycle.core.files import save_figure

log = logging.getLogger(__name__)


def write_plots(study, metric: str, out: Path) -> list[Path]:
    """PNGs of the study's ``metric`` (its first objective): optimization history, intermediate values, parameter
    importances (>= 2 complete trials with > 1 parameter varied), and a contour (>= 3 complete trials) or slice of
    max_lr vs pct_start.

    A plot that cannot be drawn yet (too few trials) is skipped with a warning; it never stops the study.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    varied = sorted({k for t in complete for k in t.params
                     if len({repr(u.params.get(k)) for u in complete}) > 1})
    pair = [k for k in ("schedule.max_lr", "schedule.pct_start") if any(k in t.params for t in complete)]
    # several objectives: Optuna's plots need the one to draw
    of = {"target_name": metric} | ({"target": _first_value} if len(study.directions) > 1 else {})
    jobs: list[tuple[str, Callable[[], Any]]] = []
    if complete:
        jobs.append(("optimization_history", lambda: ovm.plot_optimization_history(study, **of)))
    if any(t.intermediate_values for t in trials):
        jobs.append(("intermediate_values", lambda: ovm.plot_intermediate_values(study)))
    if len(complete) >= 2 and len(varied) > 1:
        jobs.append(("param_importances", lambda: ovm.plot_param_importances(study, **of)))
    if len(pair) == 2 and len(complete) >= 3 and set(pair) <= set(varied):
        jobs.append(("contour_max_lr_pct_start", lambda: ovm.plot_contour(study, params=pair, **of)))
    elif pair and complete:
        jobs.append(("slice_max_lr_pct_start", lambda: ovm.plot_slice(study, params=pair, **of)))
    written = []
    for name, draw in jobs:
        # Optuna's plots switch matplotlib's style for the whole process; keep that inside this plot.
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fig = np.ravel(draw())[0].figure
                _readable_log_ticks(fig)
            except Exception as exc:
                log.warning("tune: skipped the %s plot (%s)", name, " ".join(str(exc).split())[:160])
                plt.close("all")
                continue
            path = out / f"{name}.png"
            save_figure(fig, path, dpi=110, bbox_inches="tight")
        written.append(path)
    return written


def _readable_log_ticks(fig) -> None:
    """Label a log axis at 1, 2 and 5 of each decade, as plain numbers (0.05, 0.1, 0.2): matplotlib's own labels of a
    range within a decade (a max_lr search) are 2x10^-1, 3x10^-1, ... at every minor tick, and overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax in fig.axes:
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())


def _first_value(trial) -> float:
    return trial.values[0]


def plot_front(study, goals, path: Path) -> Path:
    """reports/tune/pareto.png: every complete trial's score (the first goal) against its cost (the second), the
    Pareto front drawn as a step line through its trials, each labelled with its number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    from onecycle.tuning.objectives import front

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = sorted(front(study), key=lambda t: (t.values[1], t.values[0]))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([t.values[1] for t in complete], [t.values[0] for t in complete], s=18, color="0.65",
               label=f"trials ({len(complete)})")
    ax.step([t.values[1] for t in best], [t.values[0] for t in best], where="post", color="C3", marker="o",
            label=f"Pareto front ({len(best)})")
    for t in best:
        ax.annotate(str(t.number), (t.values[1], t.values[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"{goals[1].metric} ({goals[1].direction})")
    ax.set_ylabel(f"{goals[0].metric} ({goals[0].direction})")
    ax.set_title(f"Optuna study {study.study_name}: Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    return path
