"""The ONNX export of a model file: the same probabilities as torch (test-time augmentation included) for any batch
size, a check that refuses an export that disagrees, a served classifier that scores a request as one batch on
either runtime, and an ONNX path that imports no torch."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from onecycle.serving.classifier import ImageClassifier
from onecycle.serving.inference import load_model_file
from onecycle.serving.onnx_export import CHECK_IMAGES, TOLERANCE, OnnxExportError, check_onnx, export_onnx
from onecycle.serving.onnx_model import OnnxScorer
from onecycle.serving.publish import onnx_requirements, served_requirements

CLASSES = [f"class{i}" for i in range(10)]


def _model_file(path: Path, seed: int = 0, augment_eval=None, shape=(28, 28, 1)) -> Path:
    from onecycle.config import parse_params
    from onecycle.serving.modelfile import save_model
    from onecycle.training.models import build_model

    params = parse_params({"model": {"width": 0.125}, "augment": {"eval": augment_eval or []}})
    c = shape[2]
    info = SimpleNamespace(name="fashion_mnist" if c == 1 else "imagefolder", classes=CLASSES, image_shape=shape,
                           mean=[0.3] * c, std=[0.3] * c)
    torch.manual_seed(seed)
    net = build_model(params.model, 10, c)
    with torch.no_grad():  # trained-looking batch-norm statistics and confident answers, as after training
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.weight.mul_(30.0)
    save_model(params.model, params.augment, info, net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    from onecycle.training import checkpoint as ckpt

    folder = tmp_path_factory.mktemp("onnx")
    model = _model_file(folder / "model.pt")
    published = folder / "published.pt"  # as the torch classifier holds it: the model file and its tta
    ckpt.save({**ckpt.load(model), "tta": "flip"}, published)
    return {"pt": model, "published": published, "onnx": export_onnx(model, folder / "model.onnx", tta="flip"),
            "folder": folder}


def _png(seed: int, size=(28, 28)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_the_export_scores_as_torch_does_with_test_time_augmentation(exported, batch):
    onnx, _, _ = load_model_file(exported["onnx"])
    reference, _, _ = load_model_file(exported["pt"], "cpu", tta="flip")
    without, _, _ = load_model_file(exported["pt"], "cpu", tta="none")
    x = np.random.default_rng(batch).standard_normal((batch, 1, 28, 28), dtype=np.float32)
    ours, theirs = onnx(x), reference(x)
    assert ours.shape == (batch, 10) and ours.dtype == np.float32
    np.testing.assert_allclose(ours.sum(1), 1.0, atol=1e-5)
    assert np.abs(ours - theirs).max() < 1e-5
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    assert np.abs(ours - without(x)).max() > 1e-3  # the flip is in the graph, visibly


def test_the_onnx_file_describes_itself(exported):
    scorer = OnnxScorer(exported["onnx"])
    assert scorer.tta == "flip" and scorer.ds.classes == CLASSES and list(scorer.ds.image_shape) == [28, 28, 1]
    assert scorer.augment_eval == [] and scorer.metadata["model"]["width"] == 0.125
    assert [i.name for i in scorer.session.get_inputs()] == ["images"]
    assert scorer.session.get_inputs()[0].shape[0] == "batch"  # any batch size


def test_the_check_passes_an_equal_export_and_refuses_another_network(exported, tmp_path):
    batches = [np.random.default_rng(i).standard_normal((50, 1, 28, 28), dtype=np.float32) for i in range(3)]
    result = check_onnx(exported["onnx"], exported["pt"], batches, limit=120)
    assert result["images"] == 120 and result["top1_differ"] == 0 and result["max_abs_diff"] < TOLERANCE
    other = _model_file(tmp_path / "other.pt", seed=1)
    with pytest.raises(OnnxExportError, match=r"does not score as .*other\.pt does on 150 images"):
        check_onnx(exported["onnx"], other, batches)
    assert CHECK_IMAGES >= 10_000  # one image in 10,000 can be seen


def test_the_served_classifier_scores_a_request_as_one_batch_on_either_runtime(exported):
    images = [_png(0), b"not an image", _png(1), _png(2, (40, 30))]  # a bad one in the middle; another size
    request = pd.DataFrame({"image": images})
    onnx = ImageClassifier(exported["onnx"])
    torch_clf = ImageClassifier(exported["published"])
    calls = []
    score = onnx.score
    onnx.score = lambda x: calls.append(len(x)) or score(x)
    answers = onnx(request, {"k": 10})
    assert calls == [3]  # the three readable images, in one call
    assert "not a readable image" in answers[1]["error"]
    for ours, theirs, alone in zip(answers, torch_clf(request, {"k": 10}),
                                   [onnx(pd.DataFrame({"image": [img]}), {"k": 10})[0] if i != 1 else None
                                    for i, img in enumerate(images)], strict=True):
        if "error" in ours:
            assert ours["error"].startswith("image 1: not a readable image") and "error" in theirs
            continue
        assert [c["class"] for c in ours["top_k"]] == [c["class"] for c in theirs["top_k"]]
        np.testing.assert_allclose([c["probability"] for c in ours["top_k"]],
                                   [c["probability"] for c in theirs["top_k"]], atol=1e-5)
        np.testing.assert_allclose([c["probability"] for c in ours["top_k"]],
                                   [c["probability"] for c in alone["top_k"]], atol=1e-6)  # batched == alone


def test_a_large_request_is_scored_in_bounded_batches(tmp_path):
    model = _model_file(tmp_path / "model.pt", shape=(224, 224, 3))
    clf = ImageClassifier(export_onnx(model, tmp_path / "model.onnx"))
    assert clf.batch == 27  # 16 MiB of input per network call
    calls = []
    score = clf.score
    clf.score = lambda x: calls.append(len(x)) or score(x)
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (224, 224), (10, 200, 30)).save(buf, format="PNG")
    answers = clf({"image": [buf.getvalue()] * 30}, None)
    assert calls == [27, 3] and len(answers) == 30 and all(a == answers[0] for a in answers)


BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "onnx", "onnxscript", "albumentations", "cv2"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, _NoTorch())
"""


def test_the_onnx_path_imports_no_torch(exported):
    """The served classifier, predict (a model.onnx) and the demo's scoring, with torch made unimportable."""
    png = exported["folder"] / "a.png"
    png.write_bytes(_png(3))
    code = BLOCK_TORCH + f"""
import json
from onecycle.serving.classifier import ImageClassifier
from onecycle.stages import predict
answer = ImageClassifier({str(exported["onnx"])!r})({{"image": [open({str(png)!r}, "rb").read()]}}, {{"k": 2}})
assert predict.main(["--model", {str(exported["onnx"])!r}, {str(png)!r}, "--json", "-k", "2"]) == 0
print(json.dumps(answer[0]))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=exported["folder"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *printed, served = proc.stdout.strip().splitlines()
    predicted = json.loads(printed[-1])["top_k"]
    assert json.loads(served)["top_k"] == predicted and len(predicted) == 2


def test_the_onnx_models_requirements_hold_no_torch():
    onnx = [r.split("==")[0] for r in onnx_requirements([])]
    assert onnx == ["onnxruntime", "numpy", "pillow", "pandas", "mlflow-skinny", "sqlalchemy", "alembic"]
    assert all("==" in r for r in onnx_requirements([]))
    assert "albumentations" in " ".join(onnx_requirements(["ToGray"]))
    assert "torch" in [r.split("==")[0] for r in served_requirements([])]  # the torch classifier's


def test_a_network_that_cannot_be_exported_is_served_on_torch(exported, tmp_path, monkeypatch):
    from onecycle.serving import onnx_export

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::something")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    onnx, check = onnx_export.export_for_serving(exported["pt"], tmp_path / "model.onnx", "flip", None, None)
    assert onnx is None and not (tmp_path / "model.onnx").exists()
    assert check["error"].endswith("cannot be exported to ONNX: unsupported operator aten::something")
