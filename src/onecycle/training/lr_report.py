"""Reading ``reports/lr_find.json``, the LR range test's report: the LR that ``schedule.max_lr: auto`` means,
and the MLflow run that measured it. Train and tune read the report here, without the range-test engine.

The report records what it was measured on (:func:`measured_on`: the fetched data's digest and the params
that change the suggestion); ``train`` refuses a report measured on something else (:func:`check_measured_on`),
as after switching ``data.dataset`` without running ``onecycle lr-find`` again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onecycle.core.errors import OneCycleError

# the params that change what the range test measures and which LR it suggests (data.source and data.root
# only say where the data lies: its content is the digest); device, seed, threads and workers do not
MEASURED_SECTIONS = ("model", "optimizer", "lr_find")
MEASURED_KEYS = ("data.dataset", "data.val_size", "data.train_subset", "data.batch_size", "augment.train",
                 "train.amp", "train.amp_on_cpu", "train.label_smoothing", "train.grad_clip")


class NoDescentError(OneCycleError):
    """The loss never went down during the sweep."""


def read_suggestion(path: Path) -> float:
    """The LR ``train`` uses for ``schedule.max_lr: auto``: the chosen suggestion in reports/lr_find.json."""
    if not path.is_file():
        raise OneCycleError(f"schedule.max_lr is auto but {path} does not exist: run `onecycle lr-find` "
                            "(or `dvc repro lr_find`) first, or set schedule.max_lr to a number")
    try:
        report = json.loads(path.read_text())
    except ValueError:
        raise OneCycleError(f"{path} is corrupt: run `onecycle lr-find` again") from None
    lr = report.get("suggested_lr")
    if lr is None:
        raise NoDescentError(f"schedule.max_lr is auto but the LR finder found no suggestion ({path}: the loss never "
                             "descended); set schedule.max_lr to a number or widen lr_find.start_lr/end_lr")
    return float(lr)


def measured_on(flat_params: dict[str, Any], data_digest: str) -> dict[str, Any]:
    """What a range test measures with these dotted params (``Params.flat()``) on the fetched data whose digest is
    ``data_digest``: {dotted key: value}."""
    record = {k: v for k, v in flat_params.items() if k in MEASURED_KEYS or k.split(".")[0] in MEASURED_SECTIONS}
    record["data.digest"] = data_digest
    return record


def check_measured_on(report: Path, now: dict[str, Any]) -> None:
    """Refuse ``report`` in one line when it was measured on other data or params than ``now`` (a
    :func:`measured_on` record), or does not record what it was measured on."""
    try:
        recorded = json.loads(Path(report).read_text()).get("measured_on")
    except (OSError, ValueError, AttributeError):
        return  # read_suggestion says what is wrong with it
    if not isinstance(recorded, dict):
        raise OneCycleError(f"{report} does not record what it was measured on (its `measured_on`); run "
                            "`onecycle lr-find` (or `dvc repro lr_find`) to measure it again, or set schedule.max_lr "
                            "to a number")
    keys = ["data.dataset", *sorted(k for k in set(now) | set(recorded) if k not in ("data.dataset", "data.digest")),
            "data.digest"]
    for key in keys:
        if recorded.get(key) != now.get(key):
            if key == "data.digest":
                was = f"{report} was measured on other {now.get('data.dataset')} data"
                have = "the dataset has been fetched again with other content since"
            else:
                was = f"{report} was measured with {key} = {json.dumps(recorded.get(key))}"
                have = f"the params say {json.dumps(now.get(key))}"
            raise OneCycleError(f"{was}, but {have}; run `onecycle lr-find` (or `dvc repro lr_find`) to measure "
                                "it again, or set schedule.max_lr to a number")


def resolve_max_lr(max_lr: float | str, report: Path, *, measured_now: dict[str, Any] | None = None) -> float:
    """``schedule.max_lr``, or the LR finder's chosen suggestion (in ``report``) when it is ``auto``.

    With ``measured_now`` (a :func:`measured_on` record of the params and data at hand), a report measured on
    other data or params is refused (:func:`check_measured_on`).
    """
    if max_lr != "auto":
        return float(max_lr)
    if measured_now is not None:  # first: a stale report's own problems (no suggestion) are beside the point
        check_measured_on(report, measured_now)
    return read_suggestion(report)


def lr_find_run_id(report: Path) -> str | None:
    """The MLflow run of the LR finder that wrote ``report``, if any."""
    try:
        return json.loads(Path(report).read_text()).get("mlflow_run_id")
    except (OSError, ValueError):
        return None
