"""A Hugging Face Space (Gradio SDK) that runs the demo page of :mod:`onecycle.serving.demo_app` without onecycle
installed: :func:`export_space` writes ``app.py``, a pinned ``requirements.txt``, the model as ``model.onnx`` (the
network with its test-time augmentation, exported and checked as publish does it: :mod:`onecycle.serving.onnx_export`)
run on ONNX Runtime, so the Space installs no torch, the example images and a copy of this package's source, so the
Space needs no install of onecycle from source control. A network that cannot be exported is copied as ``model.pt``
and runs on torch (with a user's model's factory package, and torch in the requirements).
:func:`space_demo` is the page that ``app.py`` builds from that folder. ``python app.py`` in it runs it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from onecycle.core.errors import OneCycleError
from onecycle.serving.demo_app import Example, build_demo
from onecycle.serving.inference import load_predictor

log = logging.getLogger(__name__)

SPACE_CONFIG = "demo.json"
# What an exported Space installs besides gradio (its version is the Space's sdk_version): the running
# environment's versions of these are written into its requirements.txt.
# albumentations only for a model whose augment.eval lists more than resize/crop (onecycle.serving.preprocessing)
SPACE_REQUIREMENTS = ("onnxruntime", "numpy", "pillow")
# ... for a network that cannot be exported to ONNX, served on torch
SPACE_TORCH_REQUIREMENTS = ("torch", "torchvision", "numpy", "pillow", "pydantic", "pyyaml")
# Spaces' free hardware is CPU: the CPU build of torch is a fraction of the CUDA one's size.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def space_demo(folder: Path):
    """The demo of an exported Space folder: its model file, examples and settings (``demo.json``)."""
    folder = Path(folder)
    cfg = json.loads((folder / SPACE_CONFIG).read_text())
    predict, ds, augment_eval = load_predictor(folder / cfg["model"], None, "cpu", tta=cfg.get("tta", "none"))
    examples = [Example(folder / e["file"], e["label"]) for e in cfg.get("examples", [])]
    return build_demo(predict, ds, augment_eval, k=int(cfg.get("top_k", 5)), examples=examples,
                      source=cfg.get("source", ""))


APP_PY = '''"""Hugging Face Space: the onecycle demo, written by `onecycle demo --export-space`.

Run it here with `python app.py` (http://127.0.0.1:7860; GRADIO_SERVER_PORT / GRADIO_SERVER_NAME change that);
Spaces runs the same file. The onecycle/ folder beside it is the package's source, so nothing is installed
from source control.
"""

import os
import sys
from pathlib import Path

# no usage analytics or telemetry (a Space variable of the same name wins)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onecycle.serving.demo_app import launch  # noqa: E402
from onecycle.serving.space_export import space_demo  # noqa: E402

demo = space_demo(HERE)

if __name__ == "__main__":
    launch(demo)
'''


def space_requirements(gradio_version: str, eval_spec: Sequence = (), torch: bool = False) -> list[str]:
    """The Space's requirements.txt (a model on ONNX Runtime; ``torch``: one on torch): the versions running here,
    each within gradio's own range for it.

    A version outside gradio's range (e.g. a newer pillow than it allows) would make the Space's install
    fail, so that package gets gradio's range instead of a pin, with a warning.
    """
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from onecycle.serving.preprocessing import needs_albumentations

    ranges = {}
    for line in requires("gradio") or []:
        req = Requirement(line)
        if req.marker is None:
            ranges[canonicalize_name(req.name)] = req.specifier
    lines = [*([f"--extra-index-url {TORCH_CPU_INDEX}"] if torch else []), f"gradio=={gradio_version}"]
    names = SPACE_TORCH_REQUIREMENTS if torch else SPACE_REQUIREMENTS
    for name in names + (("albumentations",) if needs_albumentations(list(eval_spec)) else ()):
        have = version(name).split("+")[0]
        allowed = ranges.get(canonicalize_name(name))
        if allowed is not None and not allowed.contains(have, prereleases=True):
            log.warning("%s %s is outside gradio %s's range %s: the Space installs %s%s", name, have, gradio_version,
                        allowed, name, allowed)
            lines.append(f"{name}{allowed}")
        else:
            lines.append(f"{name}=={have}")
    return lines


def space_readme(ds, gradio_version: str) -> str:
    """The Space's README.md: the front matter Spaces reads (Gradio SDK and version, app.py) and what it is."""
    return (
        "---\n"
        f"title: onecycle {ds.name} demo\n"
        "emoji: 🔁\n"
        "colorFrom: indigo\n"
        "colorTo: gray\n"
        "sdk: gradio\n"
        f"sdk_version: {gradio_version}\n"
        "python_version: \"3.11\"\n"
        "app_file: app.py\n"
        "pinned: false\n"
        "---\n\n"
        f"# onecycle demo: {ds.name}\n\n"
        "A ResNet trained with the One Cycle policy by onecycle. Upload an image and see its top classes.\n\n"
        "Written by `onecycle demo --export-space`: `app.py`, `requirements.txt`, the model file "
        "(`model.onnx`, run on ONNX Runtime), the example images and the onecycle package's source (`onecycle/`). "
        "Run it locally with `pip install gradio==" + gradio_version + " -r requirements.txt && python app.py`.\n"
    )


def export_space(out: Path, model_path: Path, ds, examples: Sequence[Example], k: int, source: str,
                 eval_spec: Sequence = (), tta: str = "none") -> Path:
    """Write a Hugging Face Space folder (Gradio SDK) that runs this demo without onecycle installed."""
    import gradio

    import onecycle
    from onecycle.training import checkpoint as ckpt
    from onecycle.training import model_registry

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / SPACE_CONFIG).is_file():
        raise OneCycleError(f"{out} exists and is not an exported Space: choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    package = Path(onecycle.__file__).resolve().parent
    shutil.rmtree(out / "onecycle", ignore_errors=True)
    shutil.copytree(package, out / "onecycle", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for old in ("model.onnx", "model.pt"):
        (out / old).unlink(missing_ok=True)
    model_file = _export_model(model_path, out, ds, examples, tta)
    if model_file == "model.pt":  # a user's model on torch: its factory's package
        model_registry.copy_code(ckpt.load(model_path)["model"]["name"], out)
    shutil.rmtree(out / "examples", ignore_errors=True)
    (out / "examples").mkdir()
    listed = []
    for e in examples:
        shutil.copyfile(e.path, out / "examples" / e.path.name)
        listed.append({"file": f"examples/{e.path.name}", "label": e.label})
    cfg = {"model": model_file, "top_k": k, "examples": listed, "source": source, "tta": tta}
    (out / SPACE_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "app.py").write_text(APP_PY)
    reqs = space_requirements(gradio.__version__, eval_spec, torch=model_file == "model.pt")
    (out / "requirements.txt").write_text("\n".join(reqs) + "\n")
    (out / "README.md").write_text(space_readme(ds, gradio.__version__))
    # Hugging Face stores binary files with Xet/LFS; `hf upload` does it by itself, git needs this line.
    (out / ".gitattributes").write_text("*.onnx filter=lfs diff=lfs merge=lfs -text\n"
                                        "*.pt filter=lfs diff=lfs merge=lfs -text\n"
                                        "*.png filter=lfs diff=lfs merge=lfs -text\n")
    return out


def _export_model(model_path: Path, out: Path, ds, examples: Sequence[Example], tta: str) -> str:
    """The Space's model file, written into ``out``: ``model.onnx`` checked against torch on the example images and
    64 random ones, or (a network that cannot be exported, with a warning) a copy of ``model_path``."""
    import numpy as np

    from onecycle.serving.inference import eval_transform, preprocess
    from onecycle.serving.onnx_export import OnnxExportError, check_onnx, export_onnx
    from onecycle.training import checkpoint as ckpt

    h, w, c = ds.image_shape
    batches = [np.random.default_rng(0).standard_normal((64, c, h, w), dtype=np.float32)]
    if examples:
        augment_eval = ckpt.load(model_path)["augment_eval"]
        transform = eval_transform(ds, augment_eval)
        batches.append(np.stack([preprocess(e.path, ds, augment_eval, transform) for e in examples]))
    try:
        check_onnx(export_onnx(model_path, out / "model.onnx", tta), model_path, batches)
        return "model.onnx"
    except OnnxExportError as exc:
        (out / "model.onnx").unlink(missing_ok=True)
        log.warning("%s: the Space runs the model on torch", exc)
        shutil.copyfile(model_path, out / "model.pt")
        return "model.pt"
