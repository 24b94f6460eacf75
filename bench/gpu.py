"""GPU benchmark: training images/s with AMP, whether the data pipeline keeps up, CIFAR-10 time to 94%.

Run on a machine with a CUDA GPU, from the repo root (`python bench/gpu.py`). Measured in one run:

  throughput  training steps (forward, backward, SGD step through onecycle's own train_step) on
              synthetic batches already on the GPU: ResNet9 (full width) on 32x32 at batch 512 and
              ResNet-50 on 224x224 at batch 256. Each in fp32 (the baseline), fp16 AMP + channels_last,
              and with --compile also torch.compile'd; images/s and the speed-up over fp32.
  feed        images/s the CIFAR-10 training loader produces (uint8 arrays, the batched
              crop/flip/cutout recipe, pinned memory) with 0 and --workers DataLoader workers,
              against the ResNet9 AMP step rate: the GPU is fed when the loader is faster.
  cifar10     with data/cifar10 fetched (`onecycle fetch` with data.dataset=cifar10): the README's
              DAWNBench recipe (ResNet9, batch 512, 24 epochs peaking at 5, fp16, channels_last)
              trained on all 50,000 images; test top-1 after every epoch (not timed) and the
              training time at which it first reaches 94%.

Figures, not assertions. `--device cpu --smoke` runs every path tiny on a CPU (what the tests do).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from onecycle.data import catalog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# the README's CIFAR-10 DAWNBench recipe, trained on all 50k training images (no validation split)
CIFAR_RECIPE = {
    "data": {"dataset": "cifar10", "batch_size": 512, "val_size": 0},
    "model": {"name": "resnet9", "width": 1.0, "whiten": False},  # the published DAWNBench network
    "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    "schedule": {"max_lr": 0.4, "peak_epoch": 5, "anneal_strategy": "linear", "div_factor": 40,
                 "final_div_factor": 1, "cycle_momentum": False},
    "train": {"epochs": 24, "amp": "fp16", "channels_last": True},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rate(model_cfg: dict, shape: tuple[int, int, int], classes: int, batch: int, device: torch.device,
              amp: bool, channels_last: bool, compile_: bool, steps: int, warmup: int) -> float:
    """Training images/s of onecycle's train_step on a synthetic batch resident on ``device``."""
    from onecycle.config import parse_params
    from onecycle.training.engine import build_optimizer, make_scaler, train_step
    from onecycle.training.models import build_model

    params = parse_params({"model": model_cfg})
    net = build_model(params.model, classes, shape[0]).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    model = torch.compile(net) if compile_ else net
    dtype = torch.float16 if amp and device.type == "cuda" else None
    opt = build_optimizer(params.optimizer, net, lr=0.01)
    scaler = make_scaler(device, dtype)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch, *shape, device=device).to(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=device)
    for _ in range(warmup):  # cuDNN autotuning, compilation
        train_step(model, x, y, opt, scaler, loss_fn, device, dtype)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        train_step(model, x, y, opt, scaler, loss_fn, device, dtype)
    sync(device)
    return steps * batch / (time.perf_counter() - t)


def feed_rate(images: np.ndarray, labels: np.ndarray, batch: int, workers: int, pin: bool, batches: int) -> float:
    """images/s the training loader yields: the CIFAR batched recipe over uint8 arrays, as train builds it."""
    from onecycle.data.loaders import ArrayDataset, make_loader, set_epoch
    from onecycle.data.transforms import BatchAugment

    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    ds = ArrayDataset(images, labels, None, seed=0, batch_transform=BatchAugment(catalog.kind("cifar10").batch_recipe, mean, std, True))
    loader = make_loader(ds, batch, shuffle=True, seed=0, num_workers=workers, pin_memory=pin)
    set_epoch(loader, 0)
    it = iter(loader)
    next(it)  # workers started, first batch out
    t, n = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(it)
        n += x.shape[0]
    return n / (time.perf_counter() - t)


def cifar_time_to(target: float, device: torch.device, base_params, smoke: bool) -> str:
    """Train the DAWNBench recipe, evaluate the test split after each epoch; report when top-1 >= target."""
    from onecycle.data.loaders import build_split, make_loader
    from onecycle.data.store import load_info
    from onecycle.training.engine import build_setup, evaluate
    from onecycle.training.loop import FitHooks, fit

    recipe = {k: dict(v) for k, v in CIFAR_RECIPE.items()}
    recipe["train"]["device"] = device.type
    if smoke:
        recipe["train"].update(epochs=2, amp=False)
        recipe["schedule"]["peak_epoch"] = 1
        recipe["model"]["width"] = 0.125
        recipe["data"].update(batch_size=64, train_subset=256)
    params = base_params.replace(**recipe)
    try:
        info = load_info(params.data)
    except Exception as exc:
        return f"skipped: {' '.join(str(exc).split())}"
    setup = build_setup(params)
    test = make_loader(build_split(params, info, "test", train_augment=False), 1024, shuffle=False, seed=0,
                       num_workers=params.data.num_workers, pin_memory=device.type == "cuda")
    clock = {"train": 0.0, "since": time.perf_counter(), "reached": None}
    lines = []

    def on_epoch(epoch: int, row: dict, steps: list, history: list) -> None:  # epoch counts from 0
        epoch += 1
        sync(device)
        clock["train"] += time.perf_counter() - clock["since"]
        top1 = evaluate(setup.model, test, setup.device, setup.dtype, params.train.channels_last)["top1"]
        lines.append(f"  after epoch {epoch:>2}: {clock['train']:7.1f} s training, test top-1 {top1:.4f}")
        if clock["reached"] is None and top1 >= target:
            clock["reached"] = (epoch, clock["train"])
        clock["since"] = time.perf_counter()

    fit(params, setup, params.schedule.max_lr, hooks=FitHooks(on_epoch=on_epoch), progress=False)
    print("\n".join(lines))
    if clock["reached"] is None:
        return f"not reached in {params.train.epochs} epochs ({clock['train']:.1f} s of training)"
    epoch, secs = clock["reached"]
    return f"{secs:.1f} s of training (epoch {epoch} of {params.train.epochs})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke, for tests)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="where data.root comes from")
    ap.add_argument("--steps", type=int, default=50, help="timed training steps per configuration (default 50)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers to compare")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models (slow to start)")
    ap.add_argument("--skip-cifar", action="store_true", help="leave out the 24-epoch CIFAR-10 run")
    ap.add_argument("--target", type=float, default=0.94, help="CIFAR-10 test top-1 to time (default 0.94)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check that every path runs")
    args = ap.parse_args(argv)
    from onecycle.config import load_params

    base_params = load_params(args.params)  # a bad params file fails now, not after the throughput runs
    os.chdir(ROOT)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU is visible; nothing measured (use a GPU machine, or --device cpu --smoke "
              "to check that it runs)", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    steps, warmup = (2, 1) if args.smoke else (args.steps, 10)
    # (name, model config, input shape, classes, batch)
    models = [("ResNet9 32x32", {"name": "resnet9", "width": 1.0}, (3, 32, 32), 10, 512),
              ("ResNet-50 224x224", {"name": "resnet50", "width": 1.0, "stem": "imagenet"}, (3, 224, 224), 1000, 256)]
    if args.smoke:
        models = [("ResNet9 32x32", {"name": "resnet9", "width": 0.125}, (3, 32, 32), 10, 16),
                  ("ResNet-50 64x64", {"name": "resnet50", "width": 1.0, "stem": "imagenet"}, (3, 64, 64), 10, 4)]
    variants = [("fp32", False, False, False), ("fp16 AMP + channels_last", True, True, False)]
    if args.compile:
        variants.append(("fp16 AMP + channels_last + compile", True, True, True))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version()}, {os.cpu_count()} CPU cores")
    print(f"{'model':<20}{'precision':<38}{'batch':>6}{'images/s':>11}{'vs fp32':>9}")
    rates: dict[str, float] = {}
    for label, cfg, shape, classes, batch in models:
        base = None
        for vname, amp, cl, comp in variants:
            ips = step_rate(cfg, shape, classes, batch, device, amp, cl, comp, steps, warmup)
            base = base or ips
            rates[f"{label} {vname}"] = ips
            print(f"{label:<20}{vname:<38}{batch:>6}{ips:>11.0f}{ips / base:>9.2f}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    n, batch = (512, 64) if args.smoke else (50_000, 512)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int64)
    gpu_rate = rates[f"{models[0][0]} fp16 AMP + channels_last"]
    batches = 4 if args.smoke else 40
    print(f"feed: CIFAR-10 training loader (pad-4 crop, flip, 8x8 cutout, batched), batch {batch}; "
          f"ResNet9 AMP step rate {gpu_rate:.0f} images/s")
    for workers in sorted({0, args.workers}):
        ips = feed_rate(images, labels, batch, workers, device.type == "cuda", batches)
        verdict = "keeps up" if ips >= gpu_rate else f"the GPU waits: {gpu_rate / ips:.1f}x short"
        print(f"  {workers} workers: {ips:>9.0f} images/s ({verdict})", flush=True)

    if args.skip_cifar:
        print("cifar10: skipped (--skip-cifar)")
    else:
        print(f"cifar10 time to {args.target:.0%} test top-1, DAWNBench recipe:", flush=True)
        print(f"cifar10: {cifar_time_to(args.target, device, base_params, args.smoke)}")
    return 0


if __name__ == "__main__":
    from onecycle.core.errors import OneCycleError

    try:
        raise SystemExit(main())
    except OneCycleError as exc:
        print(f"bench/gpu.py: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
