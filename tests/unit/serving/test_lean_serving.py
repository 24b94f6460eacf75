"""Serving without the training stack: predict, demo and the served model need no albumentations, OpenCV or SciPy.

The served model's requirements list none of them (unless its ``augment.eval`` lists a transform only
albumentations runs), a predict process and the served classifier never import them, and the lean eval
transforms compute what albumentations computes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from onecycle.data import catalog
from onecycle.serving.preprocessing import EvalTransform, needs_albumentations
from onecycle.serving.publish import served_requirements

TRAINING_STACK = ("albumentations", "albucore", "cv2", "scipy")


@pytest.mark.parametrize("dataset", catalog.DATASETS)
def test_the_served_models_requirements_list_no_albumentations_or_opencv(dataset):
    reqs = served_requirements(catalog.kind(dataset).eval_spec())
    names = [r.split("==")[0] for r in reqs]
    assert {"torch", "numpy", "pillow", "pandas", "mlflow"} <= set(names)
    assert not {"albumentations", "opencv-python-headless", "opencv-python", "scipy"} & set(names), reqs
    assert all("==" in r for r in reqs)


def test_a_model_whose_eval_list_needs_albumentations_lists_it():
    assert not needs_albumentations([{"Resize": {"height": 30, "width": 30}}, {"CenterCrop": {"height": 28, "width": 28}}])
    assert needs_albumentations(["ToGray"])
    assert needs_albumentations([{"Resize": {"height": 30, "width": 30, "interpolation": 2}}])
    assert "albumentations==" in " ".join(served_requirements([{"GaussianBlur": {"p": 1.0}}]))


def _model_file(folder: Path, dataset: str = "fashion_mnist", shape=(28, 28, 1), augment_eval=None) -> Path:
    from onecycle.config import parse_params
    from onecycle.serving.modelfile import save_model
    from onecycle.training.models import build_model

    params = parse_params({"model": {"width": 0.125}, "augment": {"eval": augment_eval or []}})
    c = shape[2]
    info = SimpleNamespace(name=dataset, classes=[f"class{i}" for i in range(10)], image_shape=shape,
                           mean=[0.3] * c, std=[0.3] * c)
    path = folder / "model.pt"
    save_model(params.model, params.augment, info, build_model(params.model, 10, c).state_dict(), path)
    return path


PROBE = """
import json, sys
{body}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {stack!r})))
"""


def _imported(code: str, cwd: Path) -> tuple[list[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(body=code, stack=TRAINING_STACK)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *out, last = proc.stdout.strip().splitlines()
    return json.loads(last), "\n".join(out)


def test_a_predict_process_imports_no_albumentations_or_opencv(tmp_path):
    from PIL import Image

    model = _model_file(tmp_path)
    Image.new("L", (40, 30), 100).save(tmp_path / "a.png")  # not 28x28: the resize path runs too
    code = (f"from onecycle.stages import predict\n"
            f"assert predict.main(['--model', {str(model)!r}, {str(tmp_path / 'a.png')!r}]) == 0")
    modules, out = _imported(code, tmp_path)
    assert out.startswith(f"{tmp_path / 'a.png'}: class")
    assert modules == []


def test_the_served_classifier_and_the_demo_page_import_no_albumentations_or_opencv(tmp_path):
    """The served model's code (ImageClassifier, as its pyfunc loads it) and the demo's module and transforms."""
    model = _model_file(tmp_path, "imagefolder", (224, 224, 3), None)
    code = f"""
import io
import pandas as pd
from PIL import Image
from onecycle.serving.classifier import ImageClassifier
from onecycle.stages import demo
from onecycle.serving.inference import load_predictor, eval_transform
buf = io.BytesIO(); Image.new("RGB", (300, 260), (10, 200, 30)).save(buf, format="PNG")
answer = ImageClassifier({str(model)!r})(pd.DataFrame({{"image": [buf.getvalue()]}}), None)
assert len(answer[0]["top_k"]) == 3, answer
_, ds, augment_eval = load_predictor(__import__("pathlib").Path({str(model)!r}), None, "cpu")
eval_transform(ds, augment_eval)
"""
    modules, _ = _imported(code, tmp_path)
    assert modules == []


@pytest.mark.parametrize("spec", [
    list(catalog.kind("imagefolder").eval_spec()),  # SmallestMaxSize 256, CenterCrop 224
    [{"Resize": {"height": 37, "width": 23}}],
    [{"LongestMaxSize": {"max_size": 50}}, {"CenterCrop": {"height": 20, "width": 30}}],
    [],
])
@pytest.mark.parametrize("shape", [(300, 411, 3), (97, 61, 3), (64, 90, 1)])
def test_the_lean_eval_transforms_compute_what_albumentations_does(spec, shape):
    from onecycle.config import AugmentConfig
    from onecycle.data.transforms import build_eval_transforms

    c = shape[2]
    mean, std = [0.4, 0.5, 0.6][:c], [0.2, 0.25, 0.3][:c]
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    image = (image.astype(np.float32) * 0.3 + np.linspace(0, 170, shape[1])[None, :, None]).astype(np.uint8)
    reference = build_eval_transforms(AugmentConfig(eval=spec), "cifar10", mean, std)(image=image)["image"]
    ours = EvalTransform(spec, mean, std)(image=image)["image"]
    if reference.ndim == 2:
        reference = reference[:, :, None]
    assert ours.shape == reference.shape and ours.dtype == np.float32
    # OpenCV resizes in fixed point: at most one grey level apart, and mostly equal
    step = 1.0 / (255 * min(std))
    assert np.abs(ours - reference).max() <= step + 1e-5
    assert np.abs(ours - reference).mean() < 0.25 * step


def test_an_exported_spaces_requirements_list_albumentations_only_when_the_model_needs_it():
    from importlib.metadata import version

    from onecycle.serving.space_export import space_requirements

    gradio = version("gradio")
    lean = space_requirements(gradio, catalog.kind("imagefolder").eval_spec())
    assert any(r.startswith("onnxruntime") for r in lean) and not any(r.startswith("albumentations") for r in lean)
    assert not any(r.startswith(("torch", "--extra-index-url")) for r in lean)  # the model runs on ONNX Runtime
    assert any(r.startswith("albumentations") for r in space_requirements(gradio, ["ToGray"]))
    on_torch = space_requirements(gradio, catalog.kind("imagefolder").eval_spec(), torch=True)  # no ONNX export
    assert any(r.startswith("torch==") for r in on_torch) and on_torch[0].startswith("--extra-index-url")
