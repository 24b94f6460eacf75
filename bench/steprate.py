"""Optimizer steps per second with per-step bookkeeping (before) vs StepGuard checks every N steps (after).

Before = per-step bookkeeping: after every optimizer step a device-to-host read of the loss
(NaN/inf check) and two all-reduces (the NaN flag, the stop flag). After = ``loop.StepGuard``: the loss
checked on the device each step, one read and one all-reduce every ``--check-every`` steps. Same model,
same batches, same run: the ratio is what the change buys. Single process::

    python bench/steprate.py

Two processes (gloo on CPU; on a GPU machine use --device cuda and nccl is used)::

    torchrun --standalone --nproc_per_node 2 bench/steprate.py
"""

from __future__ import annotations

import argparse
import time

import torch


def run(args) -> None:
    from onecycle.config import parse_params
    from onecycle.training import distributed as dist
    from onecycle.training.engine import build_optimizer, make_scaler, train_step
    from onecycle.training.loop import StepGuard
    from onecycle.training.models import build_model

    device = torch.device(args.device)
    device = dist.init(device.type) or device
    params = parse_params({"model": {"width": args.width}})
    torch.manual_seed(0)
    net = build_model(params.model, 10, 1).to(device).to(memory_format=torch.channels_last)
    model = torch.nn.parallel.DistributedDataParallel(net) if dist.world_size() > 1 else net
    opt = build_optimizer(params.optimizer, net, lr=0.01)
    scaler, loss_fn = make_scaler(device, None), torch.nn.CrossEntropyLoss()
    per_rank = args.batch // dist.world_size()
    batches = [(torch.randn(per_rank, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (per_rank,), device=device)) for _ in range(8)]

    def before(i, loss):
        bad = not bool(torch.isfinite(loss))
        dist.any_(bad)
        dist.any_(False)

    def timed(bookkeeping, steps: int) -> float:
        for i in range(3):  # warm-up
            x, y = batches[i % len(batches)]
            train_step(model, x, y, opt, scaler, loss_fn, device, None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        for i in range(steps):
            x, y = batches[i % len(batches)]
            loss, _ = train_step(model, x, y, opt, scaler, loss_fn, device, None)
            bookkeeping(i, loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - t)

    guard = StepGuard(device, args.check_every, lambda: False)

    def after(i, loss):
        guard.record(loss, i)
        if guard.due(i + 1):
            guard.check(0)

    rates = {"before": [], "after": []}
    for _ in range(args.repeats):  # alternate, so drift hits both alike
        rates["before"].append(timed(before, args.steps))
        rates["after"].append(timed(after, args.steps))
    if dist.is_main():
        b, a = max(rates["before"]), max(rates["after"])
        print(f"{dist.world_size()} process(es), {device.type}, ResNet9 width {args.width}, global batch {args.batch}, "
              f"check_every {args.check_every}: before {b:.2f} steps/s, after {a:.2f} steps/s, after/before {a / b:.3f}")
    dist.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-every", type=int, default=25)
    run(p.parse_args())


if __name__ == "__main__":
    main()
