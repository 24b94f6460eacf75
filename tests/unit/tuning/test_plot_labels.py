"""The tune plots label a log axis with a few plain numbers, never overlapping (a max_lr search spans one decade)."""

from __future__ import annotations

import math

import optuna
import pytest

from onecycle.tuning.plots import write_plots


@pytest.fixture()
def study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="labels", sampler=optuna.samplers.RandomSampler(0))

    def objective(trial):
        lr = trial.suggest_float("schedule.max_lr", 0.066, 0.66, log=True)  # a decade around an LR finder's 0.21
        pct = trial.suggest_float("schedule.pct_start", 0.1, 0.5)
        return -(math.log10(lr) + 0.7) ** 2 - (pct - 0.3) ** 2

    study.optimize(objective, n_trials=8)
    return study


def test_the_contour_plots_max_lr_axis_has_a_few_plain_labels_that_do_not_overlap(study, tmp_path, monkeypatch):
    import matplotlib.figure

    drawn, savefig = [], matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):  # the figures as written, to read their axes
        drawn.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    paths = write_plots(study, "val/top1", tmp_path)
    assert tmp_path / "contour_max_lr_pct_start.png" in paths
    (fig,) = [f for f in drawn if any(ax.get_xscale() == "log" for ax in f.axes)]
    ax = next(ax for ax in fig.axes if ax.get_xscale() == "log")
    fig.canvas.draw()
    low, high = ax.get_xlim()
    labels = [t for t in ax.get_xticklabels() if t.get_text() and low <= t.get_position()[0] <= high]
    assert [t.get_text() for t in labels] == ["0.1", "0.2", "0.5"]
    assert not [t for t in ax.get_xticklabels(minor=True) if t.get_text()]  # no labels on the minor ticks
    boxes = [t.get_window_extent() for t in labels]
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:], strict=False))  # side by side, none over another
