"""Which model file an evaluation measured: ``onecycle evaluate`` records the digest of ``models/model.pt`` it scored
(and the test-time augmentation, and the digest of the ``reports/metrics.json`` it wrote) in
``reports/evaluated_model.json``; ``onecycle publish`` registers a model only when that record names the very file
and metrics at hand (:func:`check`), so a version never carries another model's score (``train`` then ``publish``
without ``evaluate``, a metrics.json from an older model, an evaluation with another ``evaluate.tta``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from onecycle.core.errors import OneCycleError
from onecycle.core.files import atomic_write_text


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def record(path: Path, model: Path, model_sha256: str, tta: str, metrics: Path) -> None:
    """Write the evaluation record ``path``: the model file and its digest, the test-time augmentation, and the
    digest of the metrics file written from them (write it last, after the metrics)."""
    atomic_write_text(path, json.dumps({"model": str(model), "model_sha256": model_sha256, "tta": tta,
                                        "metrics_sha256": file_digest(metrics)}, indent=2) + "\n")


def check(path: Path, model: Path, tta: str, metrics: Path) -> None:
    """Refuse in one line (OneCycleError) unless the record ``path`` says ``metrics`` were measured on ``model`` as
    it is now, with ``tta``."""
    again = f"run `onecycle evaluate` (or `dvc repro`) so that {metrics} measures it"
    try:
        done = json.loads(Path(path).read_text())
        wanted = {key: done[key] for key in ("model_sha256", "tta", "metrics_sha256")}
    except (OSError, ValueError, KeyError, TypeError):
        raise OneCycleError(f"{path} is missing or unreadable, so nothing says which model {metrics} measured: "
                            f"{again}") from None
    now = file_digest(model)
    if wanted["model_sha256"] != now:
        raise OneCycleError(f"{model} is not the model file {metrics} measured (sha256 {now[:12]}, evaluated "
                            f"{str(wanted['model_sha256'])[:12]}): {again}")
    if wanted["tta"] != tta:
        raise OneCycleError(f"{metrics} was measured with evaluate.tta {wanted['tta']}, but the params say {tta}: "
                            f"{again}")
    if not Path(metrics).is_file() or wanted["metrics_sha256"] != file_digest(metrics):
        raise OneCycleError(f"{metrics} is not the one the evaluation of {model} wrote (an evaluate that did not "
                            f"finish?): {again}")
