"""DDP: `torchrun --standalone --nproc_per_node 2` with gloo on CPU equals one process with the same global batch."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onecycle.data.loaders import EpochSampler, ShardSampler
from onecycle.training import checkpoint as ckpt
from tiny import tiny_params, write_fetched

BIN = Path(sys.executable).parent


def test_ranks_split_every_global_batch_between_them():
    whole = EpochSampler(20, shuffle=True, seed=3, batch_size=8)
    whole.set_epoch(2)
    order = list(whole)
    parts = []
    for rank in range(2):
        s = EpochSampler(20, shuffle=True, seed=3, batch_size=8, rank=rank, world=2)
        s.set_epoch(2)
        parts.append(list(s))
        assert len(s) == len(parts[-1]) == 8  # 2 full global batches of 8, 4 each; the last 4 are dropped
    for k in range(2):  # global batch k = rank 0's 4 + rank 1's 4, in order
        assert parts[0][4 * k:4 * k + 4] + parts[1][4 * k:4 * k + 4] == order[8 * k:8 * k + 8]
    resumed = EpochSampler(20, shuffle=True, seed=3, batch_size=8, rank=1, world=2)
    resumed.set_epoch(2)
    resumed.skip_batches = 1
    assert list(resumed) == parts[1][4:]


def test_evaluation_shards_cover_every_example_once():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def _train(work: Path, cmd: list) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _workdir(base: Path, name: str, **train) -> Path:
    work = base / name
    # 640 - 128 validation = 512 training images = 8 full global batches of 64 (DDP drops incomplete ones)
    write_fetched(work / "data", n_train=640, n_test=100)
    # deterministic augmentation: the runs differ only in BatchNorm statistics (per process: 32 images
    # instead of 64; SyncBatchNorm is CUDA-only) and in the order of floating-point sums
    tiny_params(work, augment={"train": [{"CenterCrop": {"height": 28, "width": 28}}]},
                train={"epochs": 2, **train})
    return work


def _history(work: Path) -> list[dict]:
    with open(work / "reports/history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    import mlflow

    single = _workdir(tmp_path, "single")
    _train(single, [BIN / "onecycle", "train"])
    ddp = _workdir(tmp_path, "ddp")
    proc = _train(ddp, [BIN / "torchrun", "--standalone", "--nproc_per_node", "2", "-m", "onecycle", "train"])
    assert proc.stdout.count("epoch 2/2") == 1  # rank 0 alone reports
    assert "x 2 processes" in proc.stdout
    a, b = _history(single), _history(ddp)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        # stated tolerance: per-process BatchNorm batches (32 vs 64 images) move losses by a few hundredths
        assert float(rb["train_loss"]) == pytest.approx(float(ra["train_loss"]), abs=0.02)
        assert float(rb["val_loss"]) == pytest.approx(float(ra["val_loss"]), abs=0.05)
        assert abs(float(rb["val_top1"]) - float(ra["val_top1"])) <= 0.1
    wa = ckpt.load(single / "models/model.pt")["state_dict"]
    wb = ckpt.load(ddp / "models/model.pt")["state_dict"]
    assert set(wa) == set(wb)  # plain (unwrapped) parameter names, loadable without DDP
    conv = "prep.0.weight"  # the first layer moved the same way in both runs
    assert torch.nn.functional.cosine_similarity(wa[conv].flatten(), wb[conv].flatten(), dim=0) > 0.99
    mlflow.set_tracking_uri(f"sqlite:///{ddp / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["processes"] == "2"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/top1")] == [1, 2]
    assert json.loads((ddp / "reports/runs.json").read_text())["train"] == runs[0].info.run_id


@pytest.mark.slow
def test_nproc_per_node_relaunches_under_torchrun(tmp_path):
    work = _workdir(tmp_path, "w", nproc_per_node=2, epochs=1)
    proc = _train(work, [BIN / "onecycle", "train"])
    assert "x 2 processes" in proc.stdout
    assert len(_history(work)) == 1
    assert ckpt.load(work / "checkpoints/last.pt")["finished"]


FAIL_ON_RANK = '''
import errno, os, sys
from onecycle.stages import train
from onecycle.stages.command import guarded, setup_logging
from onecycle.config import load_params
from onecycle.training.engine import train_step
from onecycle.core.paths import Workspace

calls = 0

def step(*args, **kwargs):
    global calls
    calls += 1
    if int(os.environ["RANK"]) == int(sys.argv[1]) and calls == 3:
        raise OSError(errno.ENOSPC, "No space left on device (injected)", "checkpoints/last.pt")
    return train_step(*args, **kwargs)

setup_logging()
sys.exit(guarded("train", lambda: train.run(load_params("params.yaml"), Workspace(), step_fn=step, progress=False)))
'''


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1])
def test_an_error_on_one_rank_ends_the_whole_job_promptly_with_that_error(tmp_path, rank):
    """Without it the other rank waits in a barrier (or the failing one does) until gloo's 30-minute timeout."""
    work = _workdir(tmp_path, "w", epochs=2)
    (work / "fail_on_rank.py").write_text(FAIL_ON_RANK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [BIN / "torchrun", "--standalone", "--nproc_per_node", "2", "fail_on_rank.py", str(rank)]
    # far below gloo's 30-minute collective timeout that a hang would end in (generous for a loaded machine)
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert ("onecycle train: error: no space left on the disk writing checkpoints/last.pt (No space left on device "
            "(injected)); free some space and run again") in out, out[-3000:]
    assert "Timeout" not in out and "timed out" not in out, out[-3000:]


@pytest.mark.slow
def test_sigterm_to_a_relaunched_train_stops_its_workers_with_a_checkpoint_and_exit_130(tmp_path):
    import signal

    work = _workdir(tmp_path, "w", nproc_per_node=2, epochs=6)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([BIN / "onecycle", "train"], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines = []
    for line in proc.stdout:  # wait for the first epoch to be reported (and checkpointed)
        lines.append(line)
        if line.startswith("epoch 1/6"):
            break
    assert proc.poll() is None, "".join(lines)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out[-3000:]
    state = ckpt.load(work / "checkpoints/last.pt")
    assert 1 <= state["epoch"] < 6 and not state.get("finished"), out[-3000:]
    orphans = []  # no worker left running in the work folder
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc_dir / "cwd")) == work:
                orphans.append((proc_dir / "cmdline").read_bytes())
        except OSError:
            continue
    assert orphans == []


@pytest.mark.slow
def test_a_sigterm_to_every_process_of_the_job_still_stops_the_workers_at_a_step_with_a_checkpoint(tmp_path):
    """A scheduler that signals every process of a job (Slurm's scancel and preemption): each worker gets SIGTERM
    from it and again through torchrun, and the second is the same request, not an abort."""
    import signal

    work = _workdir(tmp_path, "w", nproc_per_node=2, epochs=6)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([BIN / "onecycle", "train"], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1/6"):
            break
    assert proc.poll() is None, "".join(lines)
    job = [int(d.name) for d in Path("/proc").glob("[0-9]*") if _cwd(d) == work]  # the command, torchrun, workers
    assert len(job) >= 4, job
    for pid in job:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out[-3000:]
    assert "stopped at epoch" in out or "stopped after epoch" in out, out[-3000:]  # at a step, checkpointed
    state = ckpt.load(work / "checkpoints/last.pt")
    assert 1 <= state["epoch"] < 6 and not state.get("finished"), out[-3000:]


def _cwd(proc_dir: Path) -> Path | None:
    try:
        return Path(os.readlink(proc_dir / "cwd"))
    except OSError:
        return None
