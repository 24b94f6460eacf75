"""PyTorch DDP under ``torchrun``: process group, ranks, and the few collectives the trainer needs.

``torchrun --nproc_per_node N -m onecycle train`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
everything here is a no-op and training is single-process. ``data.batch_size`` is the *global*
batch: each of the N processes takes ``batch_size / N`` examples a step, so the schedule, ``max_lr``
and the number of steps per epoch are those of a single process with the same batch size. Rank 0
alone logs to MLflow, writes checkpoints and reports; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import ConfigError


def launched() -> bool:
    """Whether torchrun (or another launcher) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (from the launcher's RANK before the process group is joined)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
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


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
