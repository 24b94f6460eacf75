"""The case for One Cycle, measured: the default model trained for the same epochs under five LR schedules.

Every run starts from the same weights and sees the same batches (the default params: model, data, augmentation,
optimizer, seed, precision) and differs only in its schedule:

* ``onecycle``: One Cycle (``schedule.*``) to the LR range test's suggestion, measured here by the real range test
  (``rangetest.run_range_test``, as the lr_find stage runs it) unless ``--max-lr`` gives one;
* ``constant``: one LR throughout;
* ``cosine``: a linear warm-up over the first ``--warmup`` of the steps, then cosine to 0;
* ``step``: the classic ResNet decay, /10 at 50% and again at 75% of the steps;
* ``schedule-free``: Schedule-Free SGD (``schedulefree.SGDScheduleFree``, Defazio et al. 2024, the winner of
  AlgoPerf 2024's self-tuning track): no schedule, a linear warm-up over ``--warmup`` of the steps, the same
  momentum and weight decay; it is evaluated at its averaged weights after recomputing BatchNorm's statistics
  there on 50 training batches, as its README prescribes for BatchNorm networks.

Each schedule but One Cycle runs at each LR of its grid (multiples of the range test's LR; Schedule-Free SGD's
are 2.5-10x larger, as its authors advise 10-50x the usual SGD rates) and keeps the LR with the best final
validation top-1 (the test split is not read). The validation split is scored ``--evals-per-epoch`` times an
epoch, which gives each run's epochs to reach ``--target`` (92%). Prints every run, then one row per
schedule. A diverged run (non-finite loss) is reported as such. CPU training is deterministic for a given seed,
so the accuracies do not depend on what else runs; the seconds do (nothing else should train meanwhile).

``python bench/schedules.py [--epochs 4] [--only onecycle,constant] [--params params.yaml]``; make bench does not
run it (about 13 trainings of the default: 25 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# LR multipliers of the range test's suggestion, per schedule (One Cycle runs at the suggestion itself).
GRIDS = {
    "onecycle": (1.0,),
    "constant": (0.25, 0.5, 1.0),
    "cosine": (0.25, 0.5, 1.0),
    "step": (0.25, 0.5, 1.0),
    "schedule-free": (2.5, 5.0, 10.0),
}
BN_BATCHES = 50  # training batches that re-estimate BatchNorm's statistics at Schedule-Free's averaged weights


class NoSchedule:
    """A scheduler that leaves the LR alone (constant LR; Schedule-Free SGD schedules itself)."""

    def step(self) -> None:
        pass


def make_scheduler(name: str, optimizer, params, max_lr: float, total: int, warmup: float):
    import torch

    from onecycle.training.schedule import build_scheduler

    if name == "onecycle":
        return build_scheduler(optimizer, params.schedule, max_lr, params.train.epochs, total // params.train.epochs)
    if name == "cosine":
        warm = max(1, round(warmup * total))

        def factor(step: int) -> float:  # the LR of step ``step`` (0-based) is max_lr * factor(step)
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [total // 2, (3 * total) // 4], gamma=0.1)
    return NoSchedule()


def make_optimizer(name: str, params, net, lr: float, total: int, warmup: float):
    from onecycle.training.engine import build_optimizer, param_groups

    if name != "schedule-free":
        start = lr / params.schedule.div_factor if name == "onecycle" else lr
        return build_optimizer(params.optimizer, net, lr=start)
    import schedulefree

    groups = param_groups(net, params.optimizer.weight_decay, params.optimizer.no_decay_norm_bias)
    return schedulefree.SGDScheduleFree(groups, lr=lr, momentum=params.optimizer.momentum,
                                        weight_decay=params.optimizer.weight_decay,
                                        warmup_steps=max(1, round(warmup * total)))


def run(name: str, lr: float, params, args) -> dict:
    """Train one schedule at one LR; validation top-1 at every evaluation point and at the end."""
    import torch

    from onecycle.data.loaders import build_split, make_loader, set_epoch
    from onecycle.training.engine import build_setup, evaluate, make_scaler, to_device, train_step

    setup = build_setup(params.data, params.augment, params.model, params.train)  # same seed: same weights, batches
    tcfg, model, device, dtype = params.train, setup.model, setup.device, setup.dtype
    steps_per_epoch = len(setup.train_loader)
    total = tcfg.epochs * steps_per_epoch
    optimizer = make_optimizer(name, params, setup.net, lr, total, args.warmup)
    scheduler = make_scheduler(name, optimizer, params, lr, total, args.warmup)
    scaler = make_scaler(device, dtype)
    evals_at = {math.ceil(steps_per_epoch * k / args.evals_per_epoch) for k in range(1, args.evals_per_epoch + 1)}
    bn_loader = None
    if name == "schedule-free":
        bn_split = build_split(params.data, params.augment, setup.info, "train", train_augment=True,
                               seed=tcfg.seed + 1)
        bn_loader = make_loader(bn_split, params.data.batch_size, shuffle=True, seed=tcfg.seed + 1, num_workers=0)

    def validate() -> float:
        if bn_loader is not None:  # score the averaged weights x, with BatchNorm statistics computed at x
            optimizer.eval()
            model.train()
            with torch.no_grad():
                for images, _ in itertools.islice(bn_loader, BN_BATCHES):
                    model(to_device(images, images, device, tcfg.channels_last)[0])
        top1 = evaluate(model, setup.val_loader, device, dtype, tcfg.channels_last)["top1"]
        if bn_loader is not None:
            optimizer.train()
        model.train()
        return top1

    if bn_loader is not None:
        optimizer.train()
    model.train()
    curve, step, diverged, t0 = [], 0, False, time.perf_counter()
    for epoch in range(tcfg.epochs):
        set_epoch(setup.train_loader, epoch)
        for images, labels in setup.train_loader:
            images, labels = to_device(images, labels, device, tcfg.channels_last)
            loss, _ = train_step(model, images, labels, optimizer, scaler, setup.loss_fn, device, dtype,
                                 tcfg.grad_clip)
            scheduler.step()
            step += 1
            if step - epoch * steps_per_epoch in evals_at:
                if not math.isfinite(loss.item()):
                    diverged = True
                    break
                curve.append((step / steps_per_epoch, validate()))
        if diverged:
            break
    seconds = time.perf_counter() - t0
    reached = next((e for e, top1 in curve if top1 >= args.target), None)
    return {"schedule": name, "lr": lr, "final": None if diverged else curve[-1][1], "diverged": diverged,
            "best": max((t for _, t in curve), default=None), "epochs_to_target": reached, "curve": curve,
            "seconds": seconds}


def range_test_lr(params) -> float:
    from onecycle.training.engine import build_setup
    from onecycle.training.rangetest import run_range_test

    setup = build_setup(params.data, params.augment, params.model, params.train, with_val=False)
    result = run_range_test(setup, optimizer=params.optimizer, lr_find=params.lr_find, train=params.train,
                            progress=False)
    lr = result.suggestions.get(params.lr_find.suggestion)
    if lr is None:
        raise SystemExit(f"the range test suggests no LR ({result.reason or 'the loss did not descend'}); "
                         "give one with --max-lr")
    return lr


def fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--epochs", type=int, help="epochs of every run (default: train.epochs)")
    ap.add_argument("--only", default=",".join(GRIDS), help=f"comma-separated, of: {', '.join(GRIDS)}")
    ap.add_argument("--max-lr", type=float, help="the reference LR (default: the range test's suggestion)")
    ap.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of cosine and Schedule-Free")
    ap.add_argument("--evals-per-epoch", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.92, help="the validation top-1 whose epochs are reported")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in GRIDS]
    if unknown:
        raise SystemExit(f"unknown schedule(s) {unknown}; choose from {', '.join(GRIDS)}")

    from onecycle.config import load_params

    params = load_params(args.params)
    root = args.params.resolve().parent
    params = params.replace(data={"root": str(root / params.data.root)}, mlflow={"system_metrics": False},
                            **({"train": {"epochs": args.epochs}} if args.epochs else {}))
    if params.data.val_size <= 0:
        raise SystemExit("data.val_size is 0: the schedules are compared on the validation split")
    ref = args.max_lr or range_test_lr(params)
    print(f"reference LR {ref:.4g} ({'--max-lr' if args.max_lr else 'the range test, ' + params.lr_find.suggestion}); "
          f"{params.train.epochs} epochs; target {args.target:.0%} validation top-1", flush=True)
    print("| schedule | LR | final val top-1 | best val top-1 | epochs to target | seconds |\n|---|---|---|---|---|---|",
          flush=True)
    results = []
    for name in names:
        for mult in GRIDS[name]:
            r = run(name, ref * mult, params, args)
            results.append(r)
            print(f"| {name} | {r['lr']:.4g} | {'diverged' if r['diverged'] else fmt(r['final'], '.4f')} | "
                  f"{fmt(r['best'], '.4f')} | {fmt(r['epochs_to_target'], '.1f', 'not reached')} | "
                  f"{r['seconds']:.0f} |", flush=True)
    print(f"\nEach schedule at its best LR (chosen on the final validation top-1), {params.train.epochs} epochs:\n")
    print("| schedule | LRs tried | best LR | val top-1 | epochs to target |\n|---|---|---|---|---|")
    for name in names:
        rows = [r for r in results if r["schedule"] == name]
        ok = [r for r in rows if not r["diverged"]]
        best = max(ok, key=lambda r: r["final"]) if ok else None
        tried = ", ".join(f"{r['lr']:.3g}" for r in rows)
        print(f"| {name} | {tried} | {fmt(best and best['lr'], '.3g', 'all diverged')} | "
              f"{fmt(best and best['final'], '.4f')} | "
              f"{fmt(best and best['epochs_to_target'], '.1f', 'not reached')} |")
    return results


if __name__ == "__main__":
    main()
