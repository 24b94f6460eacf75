"""Reading ``reports/lr_find.json``, the LR range test's report: the LR that ``schedule.max_lr: auto`` means,
and the MLflow run that measured it. Train and tune read the report here, without the range-test engine.
"""

from __future__ import annotations

import json
from pathlib import Path

from onecycle.core.errors import OneCycleError


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


def resolve_max_lr(params, report: Path) -> float:
    """``schedule.max_lr``, or the LR finder's chosen suggestion (in ``report``) when it is ``auto``."""
    if params.schedule.max_lr != "auto":
        return float(params.schedule.max_lr)
    return read_suggestion(report)


def lr_find_run_id(report: Path) -> str | None:
    """The MLflow run of the LR finder that wrote ``report``, if any."""
    try:
        return json.loads(Path(report).read_text()).get("mlflow_run_id")
    except (OSError, ValueError):
        return None
