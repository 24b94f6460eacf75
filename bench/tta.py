"""Validation top-1 of a trained model with and without flip test-time augmentation, and what each costs.

Levers are chosen on the validation split (the test split is evaluate's alone): this reads ``models/model.pt``
and the params' validation split, evaluates it plain and with ``evaluate.tta: flip`` in one run, and prints
top-1, loss and seconds of each, then of flip plus 1-pixel shifts (a candidate evaluate does not offer).
``python bench/tta.py [--params params.yaml] [--model models/model.pt]``
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
    from onecycle.data.loaders import build_split, make_loader
    from onecycle.data.store import load_info
    from onecycle.serving.modelfile import load_model_bundle
    from onecycle.training.engine import evaluate

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
    # A candidate not in evaluate: flip plus 1-pixel shifts (airbench's multi-crop), measured here only.
    for name, views in SHIFT_VIEWS.items():
        t = time.perf_counter()
        top1, loss = shifted_views(model, val, views, params.train.channels_last)
        print(f"val, tta {name}: top1 {top1:.4f}, loss {loss:.4f}, {time.perf_counter() - t:.1f} s")


# (dy, dx, mirrored) per view
SHIFT_VIEWS = {
    "flip+diagonal shifts (6 views)": [(0, 0, False), (0, 0, True), (1, 1, False), (1, 1, True), (-1, -1, False),
                                       (-1, -1, True)],
    "flip+4 shifts (10 views)": [(0, 0, False), (0, 0, True)] + [(dy, dx, m) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))
                                                                  for m in (False, True)],
}


def shifted_views(model, loader, views, channels_last: bool) -> tuple[float, float]:
    """Top-1 and loss of the probabilities averaged over ``views`` (edge-replicated 1-pixel shifts, mirrors)."""
    import torch
    import torch.nn.functional as F

    from onecycle.training.engine import to_device

    model.eval()
    correct, n, loss = 0, 0, 0.0
    with torch.no_grad():
        for images, labels in loader:
            x, y = to_device(images, labels, torch.device("cpu"), channels_last)
            padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
            h, w = x.shape[2], x.shape[3]
            probs = 0
            for dy, dx, mirrored in views:
                v = padded[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                v = v.flip(3) if mirrored else v
                if channels_last:
                    v = v.contiguous(memory_format=torch.channels_last)
                probs = probs + model(v).float().softmax(1)
            probs = probs / len(views)
            loss += F.nll_loss(probs.clamp_min(1e-30).log(), y, reduction="sum").item()
            correct += (probs.argmax(1) == y).sum().item()
            n += y.numel()
    return correct / n, loss / n


if __name__ == "__main__":
    main()
