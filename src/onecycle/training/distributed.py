"""PyTorch DDP under ``torchrun``: process group, ranks, and the few collectives the trainer needs.

``torchrun --nproc_per_node N -m onecycle train`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
everything here is a no-op and training is single-process. ``data.batch_size`` is the *global*
batch: each of the N processes takes ``batch_size / N`` examples a step, so the schedule, ``max_lr``
and the number of steps per epoch are those of a single process with the same batch size. Rank 0
alone logs to MLflow, writes checkpoints and reports; every rank resumes from the checkpoint rank 0 reads
(sent to the others: on several machines only rank 0's has it).
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist

from onecycle.core.errors import ConfigError


def launched() -> bool:
    """Whether torchrun (or another launcher) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether this process is one rank of an initialised DDP process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (from the launcher's RANK before the process group is joined)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of DDP processes (1 without DDP)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process is rank 0 (or the only one): the one that logs and checkpoints."""
    return rank() == 0


def init(device_type: str) -> torch.device | None:
    """Join the process group (nccl on CUDA, gloo on CPU); return this rank's device, or None if not launched."""
    if not launched():
        return None
    if not active():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device_type)


def per_process_batch(batch_size: int) -> int:
    """The per-process share of the global batch; it must divide evenly."""
    n = world_size()
    if batch_size % n:
        raise ConfigError(f"data.batch_size must be divisible by the number of processes ({n}), got {batch_size}")
    return batch_size // n


def sum_(*values: float | int) -> list[float]:
    """Element-wise sum over all ranks (identity in a single process)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def any_(flag: bool) -> bool:
    """True on every rank when it is true on any (a stop request seen by one process stops all)."""
    if not active():
        return flag
    return sum_(1.0 if flag else 0.0)[0] > 0


def any_each(*flags: bool) -> list[bool]:
    """Each flag true on every rank when it is true on any; one collective for all of them."""
    if not active():
        return [bool(f) for f in flags]
    return [v > 0 for v in sum_(*(1.0 if f else 0.0 for f in flags))]


def from_main(value):
    """Rank 0's ``value`` on every rank (pickled over the process group; the value itself in one process).

    What rank 0 alone can know: on several machines only rank 0's has ``checkpoints/`` (the resume state).
    """
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (nothing without DDP)."""
    if active():
        dist.barrier()


def sync_or_leave() -> None:
    """At the end of a ``finally``: wait for the other ranks if this one succeeded, else leave at once.

    A rank that fails (a full disk on rank 0, out of memory on rank 1) must not wait in a barrier the
    others never reach (they wait in the next step's all-reduce): both would hang until the process
    group's timeout (30 minutes) and the real error would be replaced by a timeout. Instead the failing
    rank leaves the group and its exception propagates (one line on stderr, non-zero exit); its peers'
    collectives then fail at once (the connection is gone) and torchrun stops the job with the first
    failure. Called outside an exception (the normal end), it is a barrier.
    """
    if not active():
        return
    if sys.exception() is None:
        dist.barrier()
        return
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def run_forwarding_signals(cmd: list[str]) -> int:
    """Run ``cmd`` (torchrun) as a child; forward SIGINT/SIGTERM to it; 130 if it stopped because of them.

    torchrun passes the signal to its workers, which checkpoint and stop at the next step as a single
    process does; without forwarding, a SIGTERM to ``onecycle train`` would orphan them.
    """
    import signal
    import subprocess

    proc = subprocess.Popen(cmd)
    received: list[int] = []

    def forward(signum, _frame) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received and rc != 0:
        print("onecycle train: interrupted", file=sys.stderr)
        return 130
    return rc


def shutdown() -> None:
    """Leave the DDP process group, if any."""
    if active():
        dist.destroy_process_group()
