"""Which checkpoint a training continues from, and the lock that keeps one training per workspace.

A ``checkpoints/last.pt`` is continued only when it holds the same configuration (the params' hash) and the
same :func:`resume_identity` (architecture, dataset size, device, precision, processes); otherwise it moves,
with ``best.pt`` and the finalization record, to ``checkpoints/previous/<its config hash>/`` and training starts
fresh, with one line saying so (every ``dvc exp run`` of new params does this: a note, not a warning).
``checkpoints/previous/`` keeps the last :data:`PREVIOUS_KEPT` configurations moved there; older ones are deleted.
Finalization progress is ``checkpoints/finalize.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from onecycle.config import TrainConfig
from onecycle.core.errors import OneCycleError
from onecycle.core.paths import Workspace
from onecycle.training import checkpoint as ckpt
from onecycle.training import distributed as dist
from onecycle.training.engine import Setup

log = logging.getLogger(__name__)

FINALIZE_STATE = "finalize.json"  # in the checkpoint folder: the finalization steps done, for which run
PREVIOUS_KEPT = 5  # configurations whose checkpoints checkpoints/previous/ keeps (the most recently moved there)


def resume_identity(setup: Setup) -> dict:
    """What a checkpoint must share with this process to continue, beyond the params' hash.

    The architecture (names and shapes of the weights: a code change), the dataset (images, steps an epoch:
    the schedule's total_steps), the resolved device type, precision and number of processes.
    """
    shapes = [(k, list(v.shape)) for k, v in setup.net.state_dict().items()]
    return {"architecture": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16],
            "train_images": len(setup.train_loader.dataset), "steps_per_epoch": len(setup.train_loader),
            "device": setup.device.type, "precision": str(setup.dtype).replace("torch.", ""),
            "processes": dist.world_size()}


def _why_not_resume(state: dict, config_id: str, identity: dict | None, checkpoint_dir: Path) -> str | None:
    last = checkpoint_dir / "last.pt"
    if state.get("config_hash") != config_id:
        return f"new configuration {config_id} ({last} holds {state.get('config_hash')})"
    old = state.get("identity")
    if identity is not None and isinstance(old, dict):
        changed = [f"{k} {old.get(k)} -> {v}" for k, v in identity.items() if old.get(k) != v]
        if changed:
            return f"{last} cannot continue here: {', '.join(changed)}"
    best = checkpoint_dir / "best.pt"
    if best.is_file():
        best_hash = ckpt.load(best).get("config_hash")
        if best_hash != config_id:
            return f"{best} is from a different configuration (hash {best_hash}, now {config_id})"
    return None


def find_resume_state(train: TrainConfig, config_id: str, checkpoint_dir: Path,
                      run_finished: Callable[[str | None], bool] = lambda run_id: True,
                      identity: dict | None = None) -> dict | None:
    """The checkpoint to continue from, or None to start fresh (moving a foreign one aside, with a warning).

    ``run_finished(run_id)`` says whether a checkpoint's tracking run ended FINISHED, for a finished checkpoint
    that has no finalization record.

    A finished ``last.pt`` whose finalization is incomplete is returned too: the caller finalizes without
    training. Under DDP only rank 0 calls this (on other machines the other ranks have no checkpoints) and sends
    the result to the others (``distributed.from_main``).
    """
    last = checkpoint_dir / "last.pt"
    if not last.exists():
        return None
    if not train.resume:
        log.info("train.resume is false: training from the start; the earlier checkpoints are kept in %s",
                 _move_aside(checkpoint_dir))
        return None
    state = ckpt.load(last)  # a corrupt file is an error here, never a silent restart
    reason = _why_not_resume(state, config_id, identity, checkpoint_dir)
    if reason:
        log.info("%s: training from the start; its checkpoints move to %s (previous/ keeps the last %d)",
                 reason, _move_aside(checkpoint_dir, state.get("config_hash")), PREVIOUS_KEPT)
        return None
    if state.get("finished") and _finalized(state, checkpoint_dir, run_finished):
        log.info("the run in %s finished; training again from scratch", last)
        _move_aside(checkpoint_dir, state.get("config_hash"))
        return None
    if state.get("finished"):
        log.warning("the training in %s finished but its finalization did not: completing it in MLflow run %s, "
                    "without training again", last, state.get("mlflow_run_id"))
    else:
        log.info("resuming from %s: epoch %d of %d, MLflow run %s", last, state["epoch"], train.epochs,
                 state.get("mlflow_run_id"))
    best = checkpoint_dir / "best.pt"
    if best.is_file():
        state["best_model"] = ckpt.load(best)["model"]
    return state


def _move_aside(checkpoint_dir: Path, old_hash: str | None = None) -> Path:
    """Move the checkpoints (and finalization record) to ``previous/<their config hash>/``; of the folders there, keep
    the :data:`PREVIOUS_KEPT` moved last."""
    if old_hash is None:
        try:
            old_hash = ckpt.load(checkpoint_dir / "last.pt").get("config_hash")
        except ckpt.CheckpointError:
            old_hash = None
    base = checkpoint_dir / "previous" / str(old_hash or "unknown")
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    dest.mkdir(parents=True)
    for f in [*checkpoint_dir.glob("*.pt"), checkpoint_dir / FINALIZE_STATE]:
        if f.is_file():
            f.replace(dest / f.name)
    older = sorted((d for d in dest.parent.iterdir() if d.is_dir() and d != dest), key=lambda d: d.stat().st_mtime)
    for folder in older[:max(0, len(older) + 1 - PREVIOUS_KEPT)]:
        shutil.rmtree(folder, ignore_errors=True)
    return dest


def read_finalize(checkpoint_dir: Path) -> dict:
    """``checkpoints/finalize.json``: the finalization steps done, for which run ({} when unreadable)."""
    try:
        state = json.loads((checkpoint_dir / FINALIZE_STATE).read_text())
        return state if isinstance(state, dict) and isinstance(state.get("done"), dict) else {}
    except (OSError, ValueError):
        return {}


def _finalized(state: dict, checkpoint_dir: Path, run_finished: Callable[[str | None], bool]) -> bool:
    """Whether the finished training in ``state`` was also finalized (its run ended FINISHED after every step)."""
    record = read_finalize(checkpoint_dir)
    if record.get("run_id") == state.get("mlflow_run_id") and record.get("run_id"):
        return "end_run" in record["done"]
    return run_finished(state.get("mlflow_run_id"))  # a checkpoint with no finalization record: ask the tracker


def workspace_lock(ws: Workspace):
    """Held for a whole training: a second ``onecycle train`` in the same workspace fails at once, in one line."""
    from filelock import FileLock, Timeout

    ws.checkpoints.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(ws.checkpoints / ".train.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OneCycleError(f"another `onecycle train` is running in {ws.root.resolve()} (it holds "
                            f"{ws.checkpoints / '.train.lock'}): wait for it to end, or train in another "
                            "workspace") from None
    return _Release(lock)


class _Release(contextlib.AbstractContextManager):
    def __init__(self, lock):
        self.lock = lock

    def __exit__(self, *exc):
        self.lock.release()
        return False
