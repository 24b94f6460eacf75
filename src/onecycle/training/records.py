"""What one epoch and one optimizer step leave behind: the per-epoch record (a row of reports/history.csv,
and the MLflow metrics train and tune log from it) and the per-step LR and momentum (reports/schedule.csv).

:data:`COLUMNS` is the one list of per-epoch values: each column's name in history.csv, its MLflow metric
key, and how it is computed from the epoch's results. Adding a per-epoch metric is one :class:`Column`
here (plus, if it needs a new measurement, its computation in :mod:`onecycle.training.loop`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple


class Step(NamedTuple):
    """One optimizer step: its global index (0-based) and the LR and momentum it ran at."""

    step: int
    lr: float
    momentum: float


@dataclass(frozen=True)
class EpochResult:
    """The raw results of one epoch, from which its record is computed."""

    epoch: int  # 0-based
    train: dict  # train_one_epoch's: loss, top1, images, seconds (training only)
    val: dict  # evaluate's on the validation split (loss, top1, top5); {} without one
    steps: list[Step]
    seconds: float  # training and validation, wall clock


@dataclass(frozen=True)
class Column:
    """One per-epoch record column: its history.csv name, its MLflow key and how it is computed."""
    name: str  # reports/history.csv column and history row key
    metric: str | None  # MLflow metric key (per epoch, step = epoch number); None = not logged per epoch
    value: Callable[[EpochResult], float | int | None]


# MLflow's run page groups charts by the prefix before "/", sections in alphabetical order, then the
# unprefixed ones, then system/: the learning curves (train/, val/) first, wall_clock/ after them. The LR and
# momentum are logged per optimizer step (as "lr" and "momentum"), so the epoch's last value is not.
COLUMNS = (
    Column("epoch", None, lambda r: r.epoch + 1),
    Column("train_loss", "train/loss", lambda r: r.train["loss"]),
    Column("train_top1", "train/top1", lambda r: r.train["top1"]),
    Column("val_loss", "val/loss", lambda r: r.val.get("loss")),
    Column("val_top1", "val/top1", lambda r: r.val.get("top1")),
    Column("val_top5", "val/top5", lambda r: r.val.get("top5")),
    Column("lr", None, lambda r: r.steps[-1].lr),
    Column("momentum", None, lambda r: r.steps[-1].momentum),
    Column("epoch_seconds", "wall_clock/epoch_seconds", lambda r: round(r.seconds, 3)),
    Column("images_per_second", "wall_clock/images_per_second",
           lambda r: round(r.train["images"] / r.train["seconds"], 1)),
)
HISTORY_COLUMNS = [c.name for c in COLUMNS]
METRIC_KEYS = {c.name: c.metric for c in COLUMNS if c.metric}  # history row key -> MLflow metric key


def epoch_row(result: EpochResult) -> dict:
    """The epoch's record: one value per column (a plain dict, as checkpoints store the history)."""
    return {c.name: c.value(result) for c in COLUMNS}


def row_metrics(row: dict) -> dict[str, float]:
    """A history row as MLflow metric keys (values that are None are left out)."""
    return {METRIC_KEYS[k]: row[k] for k in METRIC_KEYS if row.get(k) is not None}


def history_csv(rows: list[dict]) -> str:
    """The history rows as CSV text (reports/history.csv, DVC plots)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_COLUMNS})
    return buf.getvalue()


# reports/schedule.csv keeps at most this many rows (plus the peak); longer runs are downsampled.
SCHEDULE_ROWS = 2000


def downsample_steps(steps: list[Step], limit: int = SCHEDULE_ROWS) -> list[Step]:
    """Every k-th step (k = ceil(n / limit)) when there are more than ``limit``, always keeping the first step,
    the peak LR's step and the last step, so the warm-up start, the peak and the end of the cycle stay exact."""
    if len(steps) <= limit:
        return list(steps)
    k = -(-len(steps) // limit)
    peak = max(range(len(steps)), key=lambda i: steps[i].lr)
    keep = set(range(0, len(steps), k)) | {peak, len(steps) - 1}
    return [steps[i] for i in sorted(keep)]


def schedule_csv(steps: list[Step]) -> str:
    """reports/schedule.csv: ``step,lr,momentum`` of the optimizer steps that ran (``downsample_steps``)."""
    return "step,lr,momentum\n" + "".join(f"{s.step},{s.lr!r},{s.momentum!r}\n" for s in downsample_steps(steps))
