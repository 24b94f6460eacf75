"""Benchmark of the default pipeline against a bare PyTorch floor, measured in one run (`make bench`).

Prints images/s for:
  (a) floor     a bare training loop of the same model, batch size and optimizer over in-memory,
                pre-augmented, pre-normalized tensors (no loader, no metrics, no logging);
  (b) trainer   onecycle's real epoch: loader + augmentation + metrics + validation + checkpoint + MLflow;
  (e) pipeline  the epoch as `dvc repro` runs it: `onecycle train` itself (the MLflow run with its system
                metrics and per-step logging, checkpoints, reports), timed by the epoch's own record
                (history.csv's epoch_seconds: training + validation, as the trainer row);
  (c) lr_find   the LR range test (goal: lr_find / plain steps < 1.1);
  (d) evaluate  test-split inference as the evaluate stage runs it;
and the machine's fp32 matmul GFLOP/s, the achieved training GFLOP/s and the ratios. Figures only, no
assertions. Run from the repo root after `onecycle fetch`; `--steps` trades time for precision.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def forward_flops(model, shape) -> float:
    """Multiply-adds x 2 of one forward pass of one image (torchinfo's count)."""
    import torchinfo

    stats = torchinfo.summary(model, input_size=(1, *shape), verbose=0, device="cpu", mode="eval")
    return 2.0 * stats.total_mult_adds


def bench_floor(params, setup, steps: int) -> float:
    """(a): the same model/optimizer/batch/precision on tensors already augmented and normalized, in memory."""
    from onecycle.training.engine import autocast, build_optimizer

    ds = setup.train_loader.dataset
    bs = params.data.batch_size
    n = bs * min(steps, 8)
    ds.set_epoch(0)
    x = torch.stack([ds[i][0] for i in range(n)])
    if params.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.tensor([int(ds.labels[i]) for i in range(n)])
    model = setup.model
    model.train()
    opt = build_optimizer(params.optimizer, model, lr=0.01)
    loss_fn = setup.loss_fn
    batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]

    def step(xb, yb):
        opt.zero_grad(set_to_none=True)
        with autocast(setup.device, setup.dtype):  # train.amp as the trainer resolves it (bf16 on CPUs that have it)
            loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()

    for xb, yb in batches[:4]:  # warm-up (oneDNN builds its kernels in the first steps)
        step(xb, yb)
    t = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    return steps * bs / (time.perf_counter() - t)


def bench_trainer(params, workdir: Path) -> tuple[float, float, int]:
    """(b): one real epoch through train.fit with validation, checkpoint and MLflow; (img/s, s, images)."""
    import mlflow

    from onecycle.core.paths import Workspace
    from onecycle.tracking.runs import RunLogger
    from onecycle.tracking.store import configure
    from onecycle.tracking.training_run import checkpointing_hooks
    from onecycle.training.engine import build_setup
    from onecycle.training.loop import fit

    p = params.replace(train={"epochs": 1})
    setup = build_setup(p.data, p.augment, p.model, p.train)
    images = len(setup.train_loader.dataset)
    os.environ["DVC_ROOT"] = str(workdir)  # keep the benchmark's runs out of the project's store
    configure("bench")
    with mlflow.start_run() as run:
        t = time.perf_counter()
        hooks = checkpointing_hooks(Workspace(workdir), "bench", run.info.run_id, RunLogger(run.info.run_id), resumed=False)
        fit(setup, 0.1, train=p.train, schedule=p.schedule, optimizer=p.optimizer, hooks=hooks, progress=False)
        secs = time.perf_counter() - t
    return images / secs, secs, images


def bench_pipeline_epoch(params, workdir: Path, images: int) -> tuple[float, float]:
    """(e): one epoch of `onecycle train` as the pipeline runs it (its own MLflow run, system metrics, checkpoints,
    reports) in ``workdir``; (``images`` / the epoch's seconds, those seconds) from its record in reports/history.csv
    (training + validation, as the trainer row counts)."""
    import csv

    from onecycle.core.paths import Workspace
    from onecycle.stages import train

    data_root = Path(params.data.root)
    p = params.replace(train={"epochs": 1}, schedule={"max_lr": 0.1},
                       data={"root": str(data_root if data_root.is_absolute() else Path.cwd() / data_root)})
    os.environ["DVC_ROOT"] = str(workdir)  # the run goes to the temporary workspace's store
    assert train.run(p, Workspace(workdir), progress=False) == 0
    row = next(csv.DictReader(open(Workspace(workdir).history_csv)))
    return images / float(row["epoch_seconds"]), float(row["epoch_seconds"])


def bench_lr_find(params, steps: int) -> float:
    from onecycle.training.engine import build_setup
    from onecycle.training.rangetest import run_range_test

    p = params.replace(lr_find={"num_iter": max(steps, 10), "end_lr": 1.0, "step_mult": None})
    setup = build_setup(p.data, p.augment, p.model, p.train, with_val=False)
    t = time.perf_counter()
    run_range_test(setup, optimizer=p.optimizer, lr_find=p.lr_find, train=p.train, progress=False)
    return p.lr_find.num_iter * params.data.batch_size / (time.perf_counter() - t)


def bench_evaluate(params, setup) -> float:
    from onecycle.data.loaders import build_split, make_loader
    from onecycle.training.engine import evaluate

    test = build_split(params.data, params.augment, setup.info, "test", train_augment=False, seed=params.train.seed)
    loader = make_loader(test, params.data.batch_size, shuffle=False, seed=0, num_workers=params.data.num_workers)
    t = time.perf_counter()
    out = evaluate(setup.model, loader, setup.device, None, params.train.channels_last, collect=True)  # fp32, as the stage
    return out["n"] / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--floor-steps", type=int, default=40, help="optimizer steps of the bare loop (default 40)")
    ap.add_argument("--lr-steps", type=int, default=100, help="LR range test steps (default 100, as lr_find)")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    from onecycle.config import load_params
    from onecycle.training.engine import build_setup
    from onecycle.training.schedule import build_scheduler  # noqa: F401  (import cost out of the timings)

    params = load_params(args.params)
    threads = torch.get_num_threads()
    setup = build_setup(params.data, params.augment, params.model, params.train)
    shape = tuple(setup.train_loader.dataset[0][0].shape)
    flops_fwd = forward_flops(setup.model, shape)
    peak = matmul_gflops()
    floor_before = bench_floor(params, setup, args.floor_steps)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, epoch_s, epoch_images = bench_trainer(params, Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        pipeline, pipeline_s = bench_pipeline_epoch(params, Path(tmp), epoch_images)
    lr_find = bench_lr_find(params, args.lr_steps)
    evaluate = bench_evaluate(params, setup)
    floor_after = bench_floor(params, setup, args.floor_steps)
    # The floor is measured first and last: a shared 2-core machine drifts by +-10% over minutes, and
    # the mean of both brackets the runs in between better than either alone.
    floor = (floor_before + floor_after) / 2
    train_flops = 3 * flops_fwd  # forward + backward (about twice the forward)

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {threads} threads; model {params.model.name} width {params.model.width}, "
          f"batch {params.data.batch_size}, input {shape}, {flops_fwd / 1e6:.1f} MFLOP/image forward; "
          f"precision {setup.precision} (floor and trainer alike)")
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s; floor measured first {floor_before:.0f} and last "
          f"{floor_after:.0f} images/s (the table uses their mean)")
    print(f"{'measurement':<40}{'images/s':>10}{'vs floor':>10}{'GFLOP/s':>10}{'of peak':>9}")
    rows = [("(a) floor: bare loop, in memory", floor, train_flops),
            (f"(b) trainer: 1 epoch ({epoch_images} img) + val", trainer, train_flops),
            (f"(c) lr_find ({max(args.lr_steps, 10)} steps)", lr_find, train_flops),
            ("(d) evaluate (test split)", evaluate, flops_fwd),
            ("(e) pipeline: `onecycle train` epoch", pipeline, train_flops)]
    for name, ips, flops in rows:
        gf = ips * flops / 1e9
        print(f"{name:<40}{ips:>10.0f}{floor / ips:>10.3f}{gf:>10.1f}{gf / peak:>9.1%}")
    print(f"b/a (time per training image, trainer vs floor): {floor / trainer:.3f}   "
          f"c/a (lr_find vs plain steps): {floor / lr_find:.3f}   trainer epoch wall: {epoch_s:.1f}s")
    print(f"e/a (the pipeline's epoch vs floor): {floor / pipeline:.3f}   e/b (pipeline vs trainer): "
          f"{trainer / pipeline:.3f}   pipeline epoch: {pipeline_s:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
