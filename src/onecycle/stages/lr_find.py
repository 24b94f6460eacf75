"""lr_find stage: run the LR range test (:mod:`onecycle.training.rangetest`) as ``train`` would train, and report it.

Writes ``reports/lr_find.json`` (LRs, raw and smoothed losses, every suggestion, the chosen one, the MLflow
run id), ``reports/lr_find.csv`` (the curve and the chosen suggestion, for ``dvc plots``) and ``reports/lr_find.png`` (log-x, the
suggestions marked), and logs all of it to an MLflow run of its own.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from onecycle.core.files import atomic_write_text, save_figure, written_together
from onecycle.core.paths import Workspace
from onecycle.core.words import count
from onecycle.stages.command import run_command
from onecycle.tracking.lr_find_run import log_range_test, lr_find_run
from onecycle.training.lr_report import NoDescentError, measured_on
from onecycle.training.rangetest import MAX_SWEEP_EPOCHS, RangeTestResult, fitted_num_iter, run_range_test

log = logging.getLogger(__name__)

LOGGED_SECTIONS = ("data", "augment", "model", "optimizer", "lr_find", "train")  # the params the sweep reads


def plot(result: RangeTestResult, chosen: str, path: Path) -> None:
    """Log-x plot of raw and smoothed loss with every suggestion marked and labelled; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
    sm = np.asarray(result.smoothed)
    for i, (name, lr) in enumerate(result.suggestions.items()):
        if lr is None:
            continue
        color = f"C{(i + 1) % 10}"  # C0 is the smoothed loss
        y = float(np.interp(np.log(lr), np.log(result.lrs), np.nan_to_num(sm, nan=np.nanmax(sm))))
        style = "-" if name == chosen else "--"
        ax.axvline(lr, color=color, ls=style, lw=1.5 if name == chosen else 1)
        ax.plot([lr], [y], "o", color=color,
                label=f"{name}: {lr:.2e}" + (" (used)" if name == chosen else ""))
    ax.set_xscale("log")
    finite = sm[np.isfinite(sm)]
    if len(finite):
        lo, hi = float(finite.min()), float(finite[0])
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), max(hi, lo) + 0.6 * (hi - lo + 1e-9))
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    title = "LR range test" + ("" if result.descended else " (loss never descended)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def run(params, ws: Workspace, *, progress: bool = True) -> RangeTestResult:
    """The lr_find stage in ``ws``: sweep, write the reports, log the MLflow run; returns the result."""
    from onecycle.training.engine import build_setup, device_name

    params = params.for_data(ws.root)
    setup = build_setup(params.data, params.augment, params.model, params.train, with_val=False, root=ws.root)
    cfg = params.lr_find
    if (num_iter := fitted_num_iter(cfg.num_iter, len(setup.train_loader))) < cfg.num_iter:
        steps = len(setup.train_loader)
        log.info("small data: %d batch%s an epoch, so the sweep takes %d steps, not lr_find.num_iter %d (at most %d "
                 "passes over the training split)", steps, "es" if steps != 1 else "", num_iter, cfg.num_iter,
                 MAX_SWEEP_EPOCHS)
        cfg = cfg.model_copy(update={"num_iter": num_iter})
    log.info("LR range test: %s sweep %.1e -> %.1e over %d steps, batch %d, %s, %s", cfg.mode, cfg.start_lr,
             cfg.resolved_end_lr, cfg.num_iter, params.data.batch_size, params.optimizer.name, setup.precision)
    result = run_range_test(setup, optimizer=params.optimizer, lr_find=cfg, train=params.train, progress=progress)
    chosen = cfg.suggestion
    logged = {k: v for k, v in params.flat().items() if k.split(".")[0] in LOGGED_SECTIONS}
    msg = (f"the loss never descended between lr {cfg.start_lr:g} and {result.lrs[-1]:g}; "
           "widen lr_find.start_lr/end_lr or set schedule.max_lr to a number")
    # the three reports replace the old ones together, and only when the sweep gave what train needs: a failed one
    # (or any error while writing) leaves every report as it was; its curve and plot still go to its MLflow run
    with lr_find_run(params.mlflow.experiment, ws.root, params.data.dataset, device_name(setup.device),
                     setup.precision, logged) as run_id, \
            written_together(ws.lr_find_csv, ws.lr_find_json, ws.lr_find_png) as staged:
        _write_reports(params, cfg, staged, ws, result, setup.info.digest, run_id)
        log_range_test(run_id, result, [staged[ws.lr_find_json], staged[ws.lr_find_png]])
        if not result.descended and params.schedule.max_lr == "auto":
            raise NoDescentError(f"{msg}; the reports of the last sweep that did are kept")
    sugg = ", ".join(f"{k} {v:.2e}" if v is not None else f"{k} -" for k, v in result.suggestions.items())
    print(f"lr_find: {count(len(result.lrs), 'step')} ({result.reason}); suggestions: {sugg}; "
          f"using {chosen} -> {ws.lr_find_json}, {ws.lr_find_png}")
    if not result.descended:
        log.warning("%s (schedule.max_lr = %s is used)", msg, params.schedule.max_lr)
    return result


def _write_reports(params, cfg, staged: dict[Path, Path], ws: Workspace, result: RangeTestResult, data_digest: str,
                   run_id: str) -> None:
    """reports/lr_find.csv (for ``dvc plots``), reports/lr_find.json and reports/lr_find.png, each written where
    ``staged`` says; ``cfg`` is the sweep's lr_find section (``num_iter`` as the data fitted it)."""
    chosen = cfg.suggestion
    suggested = result.suggestions.get(chosen)
    report = {
        **asdict(result), "suggestion": chosen, "suggested_lr": suggested, "mlflow_run_id": run_id,
        "config": {**cfg.model_dump(mode="json"), "end_lr": cfg.resolved_end_lr},
        # train refuses this report for other data or params (lr_report.check_measured_on)
        "measured_on": measured_on(params.flat(), data_digest),
    }
    # DVC plots read the per-step rows; NaN is not JSON, so a diverged point is null.
    curve = [(lr, _finite(loss), _finite(sm)) for lr, loss, sm in zip(result.lrs, result.losses, result.smoothed,
                                                                      strict=True)]
    # suggested_lr/suggestion (the same on every row): the LR schedule.max_lr auto uses, which the
    # `dvc plots` template .dvc/plots/lr_range_log.json marks on its log x axis
    mark = f",{'' if suggested is None else repr(suggested)},{chosen}"
    atomic_write_text(staged[ws.lr_find_csv], "lr,loss,smoothed_loss,suggested_lr,suggestion\n" + "".join(
        f"{lr!r},{'' if loss is None else loss},{'' if sm is None else sm}{mark}\n" for lr, loss, sm in curve))
    report["losses"] = [_finite(v) for v in result.losses]
    report["smoothed"] = [_finite(v) for v in result.smoothed]
    atomic_write_text(staged[ws.lr_find_json], json.dumps(report, indent=1, allow_nan=False) + "\n")
    plot(result, chosen, staged[ws.lr_find_png])


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def main(argv=None) -> int:
    return run_command("lr-find", __doc__.splitlines()[0], argv, lambda params, args: run(params, Workspace()) and 0)


if __name__ == "__main__":
    raise SystemExit(main())
