"""Validation top-1 of a trained model with and without flip test-time augmentation, and what each costs.

Levers are chosen on the validation split (the test split is evaluate's alone): this reads ``models/model.pt``
and the params' validation split, evaluates it plain and with ``evaluate.tta: flip`` in one run, and prints
top-1, loss and seconds of each. ``python bench/tta.py [--params params.yaml] [--model models/model.pt]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--model", type=Path, default=Path("models/model.pt"))
    args = p.parse_args()
    import torch

    from onecycle.config import load_params
    from onecycle.data import load_info
    from onecycle.engine import evaluate
    from onecycle.loaders import build_split, make_loader
    from onecycle.modelfile import load_model_bundle

    params = load_params(args.params)
    model, _, _ = load_model_bundle(args.model)
    if params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    info = load_info(params.data)
    val = make_loader(build_split(params, info, "val", train_augment=False), params.data.batch_size, shuffle=False,
                      seed=0, num_workers=0)
    results = {}
    for tta in ("none", "flip", "none", "flip"):  # twice each, alternating; the second of each is reported
        t = time.perf_counter()
        out = evaluate(model, val, torch.device("cpu"), None, params.train.channels_last, tta=tta)
        results[tta] = (out, time.perf_counter() - t)
    for tta, (out, secs) in results.items():
        print(f"val (n={out['n']}), tta {tta:<4}: top1 {out['top1']:.4f}, loss {out['loss']:.4f}, {secs:.1f} s")

if __name__ == "__main__":
    main()
