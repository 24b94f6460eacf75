"""The LR range test's cost: seconds and suggestions of shorter sweeps against the default one, in one run.

Each variant runs the real range test (``rangetest.run_range_test``, as the lr_find stage does) on the default
params with ``lr_find`` overrides, and prints its steps, seconds and the three suggestions, so a cheaper sweep
can be judged by whether it still suggests the same max_lr. The default sweep runs first and last (the
machine drifts). Nothing else may train meanwhile.

``python bench/lr_find_cost.py [LABEL_PREFIX ...]``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VARIANTS = [  # (label, params sections to override)
    ("default (params.yaml)", {}),
    ("start 1e-4, 60 steps", {"lr_find": {"start_lr": 1e-4, "num_iter": 60}}),
    ("start 1e-4, 40 steps", {"lr_find": {"start_lr": 1e-4, "num_iter": 40}}),
    ("start 1e-3, 30 steps", {"lr_find": {"start_lr": 1e-3, "num_iter": 30}}),
    ("model.whiten: true", {"model": {"whiten": True}}),
    ("model.whiten: true, start 1e-4, 60 steps", {"model": {"whiten": True}, "lr_find": {"start_lr": 1e-4, "num_iter": 60}}),
    ("default again", {}),
]


def main() -> None:
    from onecycle.config import load_params
    from onecycle.training.engine import build_setup
    from onecycle.training.rangetest import run_range_test

    base = load_params(ROOT / "params.yaml")
    base = base.replace(data={"root": str(ROOT / base.data.root)}, mlflow={"system_metrics": False})
    print("| sweep | steps | seconds | steepest | valley | minimum |")
    print("|---|---|---|---|---|---|")
    only = sys.argv[1:]  # labels starting with one of these (default: all)
    for label, overrides in VARIANTS:
        if only and not any(label.startswith(o) for o in only):
            continue
        params = base.replace(**overrides) if overrides else base
        setup = build_setup(params, with_val=False)
        t = time.perf_counter()
        result = run_range_test(params, setup, progress=False)
        seconds = time.perf_counter() - t
        s = {k: (f"{v:.4f}" if v is not None else "-") for k, v in result.suggestions.items()}
        print(f"| {label} | {len(result.lrs)} | {seconds:.1f} | {s['steepest']} | {s['valley']} | {s['minimum']} |",
              flush=True)


if __name__ == "__main__":
    main()
