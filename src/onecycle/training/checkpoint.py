"""Checkpoints: one helper writes them (atomically), one reads them (without running any code).

A checkpoint holds everything needed to continue: model, optimizer, scheduler and scaler states, the
number of finished epochs and optimizer steps, RNG states, the history rows so far, the best
validation top-1, a hash of the configuration and the MLflow run id. Files are written to a
temporary name, fsynced and renamed, so a crash leaves the previous checkpoint intact, and read
with ``torch.load(weights_only=True)``, which cannot execute code from the file.
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onecycle.core.errors import OneCycleError


class CheckpointError(OneCycleError):
    """A checkpoint that cannot be written or read."""


class _KeptErrors:
    """A file that keeps its write errors: torch.save reports a failed write (a full disk) as a RuntimeError
    from its zip writer ("enforce fail at inline_container.cc"), without the errno that says why."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically; on failure (disk full...) the old file stays and the temp is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    out = None
    try:
        with os.fdopen(fd, "wb") as f:
            out = _KeptErrors(f)
            torch.save(state, out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        Path(tmp).unlink(missing_ok=True)
        error = exc if isinstance(exc, OSError) else out.error if out is not None else None
        if error is None:  # a RuntimeError that is not a failed write: not ours to explain
            raise
        what = ("the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else
                f"the file size limit is reached ({error.strerror}; see `ulimit -f`)" if error.errno == errno.EFBIG
                else error.strerror or str(error))
        raise CheckpointError(f"could not write {path}: {what}; the previous checkpoint is intact") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; a truncated, corrupt or foreign file is a clear error."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as exc:  # zip errors, unpickling refusals, EOF: all mean "not a usable checkpoint"
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {detail}); "
                              f"delete it to start over, or restore it from a backup") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a onecycle checkpoint (expected a dict)")
    return state


def rng_state() -> dict[str, Any]:
    """RNG states in types ``weights_only`` loading accepts (tensors, ints, tuples, strings)."""
    mt = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (mt[0], torch.from_numpy(mt[1].astype(np.int64)), int(mt[2]), int(mt[3]), float(mt[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore every RNG (Python, NumPy, torch, CUDA) from :func:`rng_state`'s dict."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
