"""Speed levers of the default CPU pipeline, each measured in the real trainer against the defaults, in one run.

Each lever is a set of params overrides. For each, `train.fit` trains one short epoch (the first
`--batches` batches' worth of images of the training split, real loader, augmentation, metrics) and
the training images/s it reports is compared with the defaults' (measured first and again last, so
that drift of the machine shows). Accuracy is not measured here: a lever that changes the training
(batch size, width) needs a full run; see README: Performance. `make bench` runs bench.py; this is
`python bench/levers.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

LEVERS: list[tuple[str, dict]] = [
    ("defaults (params.yaml)", {}),
    ("threads 1", {"train": {"threads": 1}}),
    ("channels_last", {"train": {"channels_last": True}}),
    ("contiguous (not channels_last)", {"train": {"channels_last": False}}),
    ("batch 128", {"data": {"batch_size": 128}}),
    ("batch 256", {"data": {"batch_size": 256}}),
    ("batch 512", {"data": {"batch_size": 512}}),
    ("batch 512, contiguous", {"data": {"batch_size": 512}, "train": {"channels_last": False}}),
    ("1 loader worker (persistent)", {"data": {"num_workers": 1}}),
    ("2 loader workers (persistent)", {"data": {"num_workers": 2}}),
    ("label smoothing 0.1", {"train": {"label_smoothing": 0.1}}),
    ("width 0.375", {"model": {"width": 0.375}}),
    ("width 0.5", {"model": {"width": 0.5}}),
    ("whiten", {"model": {"whiten": True}}),
    ("average lookahead", {"train": {"average": "lookahead"}}),
    ("average ema", {"train": {"average": "ema"}}),
    ("fp32 (train.amp false)", {"train": {"amp": False}}),
    ("bf16 autocast on CPU (fast with AMX only)", {"train": {"amp": "bf16", "amp_on_cpu": True}}),
    ("defaults again", {}),
]


def measure(params, overrides: dict, batches: int) -> tuple[float, int]:
    """Training images/s of one short epoch of ``params`` with ``overrides`` (after an 8-batch warm-up: the shortest One Cycle schedule check_fits accepts is 5 steps)."""
    from onecycle.training.engine import build_setup, configure_threads
    from onecycle.training.loop import fit

    configure_threads(os.cpu_count() or 1)  # undo an earlier lever's thread setting
    merged = {k: dict(v) for k, v in overrides.items()}
    bs = merged.get("data", {}).get("batch_size", params.data.batch_size)
    merged.setdefault("train", {}).update(epochs=1)
    warm = params.replace(**{**merged, "data": {**merged.get("data", {}), "train_subset": 8 * bs}})
    p = params.replace(**{**merged, "data": {**merged.get("data", {}), "train_subset": batches * bs}})
    fit(build_setup(warm.data, warm.augment, warm.model, warm.train, with_val=False), 0.05, train=warm.train,
        schedule=warm.schedule, optimizer=warm.optimizer, progress=False)
    setup = build_setup(p.data, p.augment, p.model, p.train, with_val=False)
    result = fit(setup, 0.05, train=p.train, schedule=p.schedule, optimizer=p.optimizer, progress=False)
    return result.history[-1]["images_per_second"], bs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--batches", type=int, default=40, help="batches timed per lever (default 40)")
    ap.add_argument("--only", nargs="*", help="levers whose label starts with one of these")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    import contextlib
    import io

    from onecycle.config import load_params

    params = load_params(args.params)
    levers = [lv for lv in LEVERS if not args.only or lv[0].startswith(tuple(args.only)) or not lv[1]]
    print(f"{os.cpu_count()} cores, torch {torch.__version__}; defaults: {params.model.name} width "
          f"{params.model.width}, batch {params.data.batch_size}, channels_last {params.train.channels_last}, "
          f"{params.data.num_workers} workers; {args.batches} batches per lever")
    print(f"{'lever':<34}{'batch':>6}{'images/s':>10}{'vs defaults':>13}")
    base = None
    t0 = time.perf_counter()
    for label, overrides in levers:
        with contextlib.redirect_stdout(io.StringIO()):  # fit's per-epoch line
            ips, bs = measure(params, overrides, args.batches)
        base = base or ips
        print(f"{label:<34}{bs:>6}{ips:>10.0f}{ips / base:>13.2f}", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
