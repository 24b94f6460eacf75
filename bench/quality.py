"""Validation top-1 per accuracy lever: the default training with one change at a time, measured in one run.

Levers are chosen on the validation split only (the test split is evaluate's alone). Each lever trains the
default pipeline's model (``params.yaml`` with the lever's overrides; ``schedule.max_lr: auto`` resolved from
the committed ``reports/lr_find.json`` suggestions, as the train stage does) in a temporary workspace with
the real trainer, then evaluates the validation split plain and with flip test-time augmentation. Training is
bit-reproducible on a CPU, so a lever's row does not depend on when it ran (its seconds do). Prints one
table row per lever: max_lr, val top-1 (plain, flip), val loss (flip), training seconds. Nothing else may
train meanwhile (2 cores: two trainings slow each other ~8x).

``--test`` also scores the test split as the evaluate stage does (its TTA, in fp32) and prints the
epochs' mean images/s: ``python bench/quality.py --levers fp32,bf16_cpu --test`` is the README's precision table.

``python bench/quality.py [--levers default,steepest] [--seed 0] [--test]``
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LEVERS = {
    "default": {},
    "steepest": {"lr_find": {"suggestion": "steepest"}},  # max_lr = the steepest descent (~1.9x minimum here)
    "x1.5": {"max_lr_scale": 1.5},  # max_lr = 1.5x the configured suggestion
    "x2.5": {"max_lr_scale": 2.5},
    "x4": {"max_lr_scale": 4.0},
    "pct_start_0.15": {"schedule": {"pct_start": 0.15}},
    "smoothing_0.1": {"train": {"label_smoothing": 0.1}},
    "no_nesterov": {"optimizer": {"nesterov": False}},
    "lookahead": {"train": {"average": "lookahead"}},  # airbench94's lookahead, the averaged weights at the end
    "ema": {"train": {"average": "ema"}},  # an exponential moving average of the weights (decay 0.995)
    # Measured when the default was the plain prep conv and a 100-step sweep from 1e-7 (README: Performance):
    "whiten": {"model": {"whiten": True}},  # airbench's frozen whitening conv as the prep layer (18 filters)
    # whiten with the max_lr a 30-step sweep from 1e-3 suggests (bench/lr_find_cost.py: steepest 0.2212 vs 0.2009)
    "whiten_short_sweep": {"model": {"whiten": True}, "schedule": {"max_lr": 0.2212}},
    "plain_prep": {"model": {"whiten": False}},  # today's default without the whitening conv
    "batch_128": {"data": {"batch_size": 128}, "max_lr_scale": 0.5},  # twice the steps; max_lr scaled linearly
    # The CPU quality recipe (goal: 94% within 10 minutes), candidates chosen on validation:
    "epochs_16": {"train": {"epochs": 16}},
    # Precision (README: the precision table): fp32, and bf16 autocast forced on the CPU (auto's choice with AMX)
    "fp32": {"train": {"amp": False}},
    "bf16_cpu": {"train": {"amp": "bf16", "amp_on_cpu": True}},
}


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def lever_params(name: str, seed: int):
    from onecycle.config import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    extra = dict(LEVERS[name])
    scale = extra.pop("max_lr_scale", 1.0)
    raw = merge(raw, extra)
    raw["data"]["root"] = str(ROOT / raw["data"]["root"])
    raw["train"]["seed"] = seed
    raw["mlflow"]["system_metrics"] = False
    if raw["schedule"]["max_lr"] == "auto":
        found = json.loads((ROOT / "reports" / "lr_find.json").read_text())
        raw["schedule"]["max_lr"] = found["suggestions"][raw["lr_find"]["suggestion"]] * scale
    return parse_params(raw)


def measure(name: str, seed: int, test: bool = False) -> dict:
    import csv

    import torch

    from onecycle.core.paths import Workspace
    from onecycle.data.loaders import build_split, make_loader
    from onecycle.data.store import load_info
    from onecycle.serving.modelfile import load_model_bundle
    from onecycle.stages import train
    from onecycle.training.engine import evaluate

    params = lever_params(name, seed)
    with tempfile.TemporaryDirectory(prefix="quality.") as tmp:
        ws = Workspace(Path(tmp))
        t = time.perf_counter()
        rc = train.run(params, ws, progress=False)
        seconds = time.perf_counter() - t
        if rc != 0:
            raise SystemExit(f"{name}: training exited {rc}")
        model, _, _ = load_model_bundle(ws.model)
        with ws.history_csv.open() as f:
            rates = [float(row["images_per_second"]) for row in csv.DictReader(f)]
    if params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cpu, dtype = torch.device("cpu"), None  # fp32, as the evaluate stage, predict and the served model score

    def split(name: str):
        ds = build_split(params.data, params.augment, load_info(params.data), name, train_augment=False,
                         seed=params.train.seed)
        return make_loader(ds, params.data.batch_size, shuffle=False, seed=0, num_workers=0)

    val = split("val")
    plain = evaluate(model, val, cpu, dtype, params.train.channels_last, tta="none")
    flip = evaluate(model, val, cpu, dtype, params.train.channels_last, tta="flip")
    out = {"lever": name, "max_lr": params.schedule.max_lr, "val_top1": plain["top1"],
           "val_top1_flip": flip["top1"], "val_loss_flip": flip["loss"], "train_seconds": seconds,
           "images_per_second": sum(rates) / len(rates)}
    if test:
        t = time.perf_counter()
        out["test_top1"] = evaluate(model, split("test"), cpu, dtype, params.train.channels_last,
                                    tta=params.evaluate.tta)["top1"]
        out["test_seconds"] = time.perf_counter() - t
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levers", default="default,steepest", help=f"comma-separated, of: {', '.join(LEVERS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test", action="store_true", help="also score the test split as evaluate does")
    args = p.parse_args()
    names = [n.strip() for n in args.levers.split(",") if n.strip()]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown lever(s) {unknown}; choose from {', '.join(LEVERS)}")
    test_cols = " test top-1 | evaluate seconds |" if args.test else ""
    print(f"| lever | max_lr | val top-1 | val top-1, flip TTA | val loss, flip | images/s | train seconds |{test_cols}")
    print("|---|---|---|---|---|---|---|" + "---|---|" * args.test)
    for name in names:
        r = measure(name, args.seed, args.test)
        test_cells = f" {r['test_top1']:.4f} | {r['test_seconds']:.1f} |" if args.test else ""
        print(f"| {r['lever']} | {r['max_lr']:.4f} | {r['val_top1']:.4f} | {r['val_top1_flip']:.4f} | "
              f"{r['val_loss_flip']:.4f} | {r['images_per_second']:.0f} | {r['train_seconds']:.1f} |{test_cells}",
              flush=True)


if __name__ == "__main__":
    main()
