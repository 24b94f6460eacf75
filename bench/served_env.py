"""The serving environment's size and `onecycle predict`'s start-up, with and without the training stack.

* Install size: the torch classifier's pip requirements (``serving.publish.served_requirements``; the registered
  model runs on ONNX Runtime, whose environment ``bench/serving.py`` builds and measures) and everything
  they pull in, summed from the installed distributions' file lists in this environment (nothing is
  installed or downloaded). ``with albumentations`` is the list as it was before the served model stopped
  needing it (albumentations, and with it OpenCV and SciPy).
* Start-up: the best of ``--repeats`` fresh ``python -m onecycle predict`` processes classifying one image
  with a tiny model file, and which of albumentations / cv2 / scipy each imported. ``--src`` runs another
  checkout's ``src`` (e.g. ``git archive`` of an older commit) for the "before" figure.

``python bench/served_env.py [--src OLD/src]``. Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

STACK = ("albumentations", "cv2", "scipy")
CUDA = re.compile(r"^(nvidia-|cuda-|triton$)")


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def closure(names: list[str]) -> dict[str, int]:
    """distribution name -> installed bytes, for ``names`` and their runtime dependencies (markers evaluated here)."""
    from packaging.requirements import Requirement

    sizes: dict[str, int] = {}
    todo = list(names)
    while todo:
        name = _name(todo.pop())
        if name in sizes:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        sizes[name] = sum(f.locate().stat().st_size for f in dist.files or () if Path(f.locate()).is_file())
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return sizes


def startup(src: Path, model: Path, image: Path, repeats: int) -> tuple[float, list[str]]:
    code = (f"import sys, json\nfrom onecycle.stages import predict\n"
            f"assert predict.main(['--model', {str(model)!r}, {str(image)!r}]) == 0\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({STACK!r}))))")
    env = {**os.environ, "PYTHONPATH": str(src)}
    best, imported = float("inf"), []
    for _ in range(repeats):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                             cwd=model.parent).stdout
        best = min(best, time.perf_counter() - t)
        imported = json.loads(out.strip().splitlines()[-1])
    return best, imported


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=ROOT / "src", help="the onecycle source to time (default: this one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-startup", action="store_true")
    args = p.parse_args()

    from onecycle.data import catalog
    from onecycle.serving.publish import served_requirements

    now = [r.split("==")[0] for r in served_requirements(catalog.kind("imagefolder").eval_spec())]
    for label, names in (("with albumentations (before)", [*now, "albumentations"]), ("served model now", now)):
        sizes = closure(names)
        cpu = {n: s for n, s in sizes.items() if not CUDA.match(n)}  # a CPU server: torch's CPU wheel, no CUDA libs
        big = sorted(cpu.items(), key=lambda kv: -kv[1])[:5]
        print(f"{label:<30} {sum(sizes.values()) / 2**20:5.0f} MiB; without CUDA libraries "
              f"{sum(cpu.values()) / 2**20:5.0f} MiB in {len(cpu)} distributions; largest (MiB): "
              + ", ".join(f"{n} {s / 2**20:.0f}" for n, s in big))
    extra = set(closure([*now, "albumentations"])) - set(closure(now))
    print(f"{'only with albumentations':<30} " + ", ".join(sorted(extra)))
    if args.no_startup:
        return
    from PIL import Image

    from onecycle.config import parse_params
    from onecycle.serving.modelfile import save_model
    from onecycle.training.models import build_model

    with tempfile.TemporaryDirectory() as tmp:
        params = parse_params({})
        info = type("Info", (), {"name": "fashion_mnist", "classes": [str(i) for i in range(10)],
                                 "image_shape": (28, 28, 1), "mean": [0.3], "std": [0.3]})
        model = Path(tmp) / "model.pt"
        save_model(params.model, params.augment, info, build_model(params.model, 10, 1).state_dict(), model)
        image = Path(tmp) / "a.png"
        Image.new("L", (28, 28), 100).save(image)
        seconds, imported = startup(args.src.resolve(), model, image, args.repeats)
        print(f"onecycle predict, one image ({args.src}): {seconds:.2f} s (best of {args.repeats}); "
              f"imported: {', '.join(imported) or 'none of ' + '/'.join(STACK)}")


if __name__ == "__main__":
    main()
