"""Seconds each stage spends before its own work: a fresh interpreter importing the stage and loading params.

For each stage, a new ``python`` process imports the stage module (and so everything it imports at module
level), loads ``params.yaml`` and, for every stage but fetch, imports torch: all that happens before the
stage starts fetching, loading data or building its model. The heavy imports a stage
makes later, inside its work, are timed apart (MLflow when it logs, albumentations only when a listed
pipeline needs it). Each figure is the best of ``--repeats`` runs, with the bare interpreter's start-up shown
for reference. ``python bench/startup.py`` (part of ``make bench``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("fetch", "lr_find", "train", "evaluate", "publish", "predict")  # modules of onecycle.stages
LATER = {"mlflow": "import mlflow", "albumentations": "import albumentations", "torchvision": "import torchvision"}


def best_of(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PATH": "/usr/bin:/bin",
                                                                                 "NO_ALBUMENTATIONS_UPDATE": "1"})
        times.append(time.perf_counter() - t)
    return min(times)


def stage_code(stage: str) -> str:
    """What a fresh process runs before ``stage``'s own work: its import, params, and torch (every stage but fetch
    needs torch before its work, whether it imports it at module level or in run())."""
    torch = "" if stage == "fetch" else "; import torch"
    return f"import onecycle.stages.{stage}; from onecycle.config import load_params; load_params('params.yaml'){torch}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    bare = best_of("pass", args.repeats)
    print(f"bare interpreter: {bare:.2f} s; import torch alone: {best_of('import torch', args.repeats):.2f} s")
    for stage in STAGES:
        print(f"{stage:<9} before its own work: {best_of(stage_code(stage), args.repeats):.2f} s")
    for name, code in LATER.items():
        print(f"later, when used: import {name}: {best_of(code, args.repeats) - bare:.2f} s")


if __name__ == "__main__":
    main()
