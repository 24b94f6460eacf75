"""The study's PNG plots (Optuna's matplotlib visualizations) that ``onecycle tune`` writes after its trials."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onecycle.core.files import save_figure

log = logging.getLogger(__name__)


def write_plots(study, metric: str, out: Path) -> list[Path]:
    """PNGs of the study: optimization history, intermediate values, parameter importances (>= 2 complete
    trials with > 1 parameter varied), and a contour (>= 3 complete trials) or slice of max_lr vs pct_start.

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
    jobs: list[tuple[str, Callable[[], Any]]] = []
    if complete:
        jobs.append(("optimization_history", lambda: ovm.plot_optimization_history(study, target_name=metric)))
    if any(t.intermediate_values for t in trials):
        jobs.append(("intermediate_values", lambda: ovm.plot_intermediate_values(study)))
    if len(complete) >= 2 and len(varied) > 1:
        jobs.append(("param_importances", lambda: ovm.plot_param_importances(study, target_name=metric)))
    if len(pair) == 2 and len(complete) >= 3 and set(pair) <= set(varied):
        jobs.append(("contour_max_lr_pct_start", lambda: ovm.plot_contour(study, params=pair, target_name=metric)))
    elif pair and complete:
        jobs.append(("slice_max_lr_pct_start", lambda: ovm.plot_slice(study, params=pair, target_name=metric)))
    written = []
    for name, draw in jobs:
        # Optuna's plots switch matplotlib's style for the whole process; keep that inside this plot.
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fig = np.ravel(draw())[0].figure
            except Exception as exc:
                log.warning("tune: skipped the %s plot (%s)", name, " ".join(str(exc).split())[:160])
                plt.close("all")
                continue
            path = out / f"{name}.png"
            save_figure(fig, path, dpi=110, bbox_inches="tight")
        written.append(path)
    return written
