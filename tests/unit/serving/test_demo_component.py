"""The demo's upload guard goes through Gradio's public API: the ``classify`` event is registered with
``preprocess=False``, so ``gr.Image`` never opens the upload; the handler gets the file data undecoded.

(A ``gr.Image`` subclass overriding ``preprocess`` would do too, but Gradio's component metaclass writes a
``.pyi`` stub next to the module of every component class it sees created: into the installed package.)
"""

from __future__ import annotations

import base64
from types import SimpleNamespace

import pytest

gr = pytest.importorskip("gradio")


def test_the_classify_event_skips_gradios_image_preprocessing_and_patches_nothing():
    import torch

    from onecycle.serving.demo_app import build_demo

    ds = SimpleNamespace(name="fashion_mnist", classes=["a", "b"], image_shape=(28, 28, 1), mean=[0.3], std=[0.3])
    demo = build_demo(lambda x: torch.full((x.shape[0], 2), 0.5), ds, [], k=2)
    (image,) = [block for block in demo.blocks.values() if isinstance(block, gr.Image)]
    assert type(image) is gr.Image and "preprocess" not in vars(image)  # Gradio's own component, untouched
    (classify,) = [fn for fn in demo.fns.values() if fn.api_name == "classify"]
    assert classify.preprocess is False


def test_upload_source_hands_over_a_path_or_the_inline_bytes():
    from onecycle.serving.demo_app import upload_source

    png = b"\x89PNG\r\n\x1a\nnot really"
    assert upload_source({"path": None, "url": "data:image/png;base64," + base64.b64encode(png).decode()}) == png
    assert upload_source({"path": "/tmp/gradio/abc/x.png", "url": None}) == "/tmp/gradio/abc/x.png"
    assert upload_source({"path": None, "url": "data:image/png;base64,@@@"}) == b""
    assert upload_source(None) is None
