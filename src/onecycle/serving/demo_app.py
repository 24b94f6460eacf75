"""The demo's web page for a trained model: upload or drop an image, see its top classes with probabilities.

Owns the Gradio page (:func:`build_demo`), the example images it offers (:func:`write_examples`: a few of the
fetched dataset's test split, written into a folder the caller gives, never into the repository) and serving
it (:func:`launch`). Images go through :mod:`onecycle.serving.inference` exactly as with ``onecycle predict``:
the same guard (too large, a decompression bomb, truncated or not an image: refused before decoding, with a
message on the page, and the server keeps answering) and the same eval transforms. Telemetry is off, as
everywhere in onecycle (``onecycle.OFFLINE_DEFAULTS``, set before gradio is imported): Gradio's analytics and
the Hugging Face Hub's telemetry. The page uses the system fonts, and nothing is fetched from outside the machine.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onecycle.core.errors import OneCycleError
from onecycle.data.images import MAX_BYTES, ImageError, release_memory
from onecycle.serving.inference import eval_transform, preprocess, top_k

log = logging.getLogger(__name__)

DEFAULT_PORT = 7860  # Gradio's, and what Hugging Face Spaces expects
CSS = """
#input-image img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
#examples .gallery-item .container, #examples .gallery-item img { width: 56px; height: 56px; object-fit: contain; }
"""


@dataclass
class Example:
    """An example image offered on the page, with its true class."""

    path: Path
    label: str  # the true class; the file is named after its index in the test split


# ----------------------------------------------------------------------------------------------- examples

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "class"


def _one_per_class(labels: np.ndarray, n: int) -> list[int]:
    """Indices of up to ``n`` images: the first of each class in class order, then the second of each..."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(np.asarray(labels).tolist()):
        by_class.setdefault(int(y), []).append(i)
    picks: list[int] = []
    rank = 0
    while len(picks) < n and any(rank < len(v) for v in by_class.values()):
        for c in sorted(by_class):
            if rank < len(by_class[c]) and len(picks) < n:
                picks.append(by_class[c][rank])
        rank += 1
    return picks


def write_examples(data_dir: Path, classes: list[str], out: Path, n: int = 10) -> list[Example]:
    """Up to ``n`` images of the fetched test split in ``data_dir`` (one per class first), as files in ``out``.

    Array datasets (``test_x.npy``) are written as PNGs; an image folder's files are copied as they are.
    A dataset that has not been fetched gives no examples (the page still works without them).
    """
    if n <= 0:
        return []
    data_dir = Path(data_dir)
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except (OSError, ValueError):
        log.info("no fetched dataset in %s: the page shows no example images (run `onecycle fetch`)", data_dir)
        return []
    out.mkdir(parents=True, exist_ok=True)
    examples: list[Example] = []
    try:
        if (data_dir / "test_x.npy").is_file():
            from PIL import Image

            x = np.load(data_dir / "test_x.npy", mmap_mode="r")
            y = np.load(data_dir / "test_y.npy", mmap_mode="r")
            for i in _one_per_class(y, n):
                name = classes[int(y[i])] if int(y[i]) < len(classes) else str(int(y[i]))
                img = np.asarray(x[i])
                path = out / f"test-{i:05d}-{_slug(name)}.png"
                Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img).save(path)
                examples.append(Example(path, name))
        elif (data_dir / "test.csv").is_file():
            import csv

            with open(data_dir / "test.csv", newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            labels = np.asarray([int(r["label"]) for r in rows])
            for i in _one_per_class(labels, n):
                src = Path(meta["source"]) / rows[i]["path"]
                name = classes[labels[i]] if labels[i] < len(classes) else str(labels[i])
                path = out / f"test-{i:05d}-{_slug(name)}{src.suffix.lower()}"
                shutil.copyfile(src, path)
                examples.append(Example(path, name))
    except (OSError, ValueError, KeyError, IndexError) as exc:
        log.warning("cannot write example images from %s (%s): the page shows none", data_dir, exc)
        return []
    return examples


# ----------------------------------------------------------------------------------------------- the page

def upload_source(payload) -> str | bytes | None:
    """The uploaded image as :func:`onecycle.data.images.open_image` takes it, undecoded: a path, or bytes.

    The page's ``classify`` event is registered with ``preprocess=False`` (Gradio's public switch), so
    ``gr.Image`` never opens the upload with PIL before the handler runs, and a corrupt file or a
    decompression bomb meets the same guard, and messages, as ``onecycle predict`` and nothing before it.
    The handler gets the image's file data as a dict: the path of the file in Gradio's cache (Gradio has
    already checked it is one of its uploads, and saved an image sent inline as a ``data:`` URL there), or
    the ``data:`` URL itself.
    """
    import base64
    import binascii

    if not payload:
        return None
    if not isinstance(payload, dict):  # a path (examples, older clients)
        return str(payload)
    url = payload.get("url") or ""
    if not payload.get("path") and url.startswith("data:"):
        try:
            return base64.b64decode(url.partition(",")[2], validate=False)
        except (binascii.Error, ValueError):
            return b""  # answered as "not a readable image"
    return str(payload["path"]) if payload.get("path") else None


def build_demo(predict, ds, augment_eval: list, *, k: int = 5, examples: Sequence[Example] = (),
               source: str = ""):
    """The Gradio page: an image input (upload, drop, paste, or an example) and the top-``k`` classes.

    ``predict``, ``ds`` and ``augment_eval`` are what :func:`inference.load_predictor` returns. The
    classification endpoint is named ``classify`` (``/gradio_api/call/classify`` for API clients).
    """
    try:
        import gradio as gr
    except ImportError:
        raise OneCycleError("the demo needs gradio: pip install 'onecycle[demo]' (`make setup` installs it)") from None

    transform = eval_transform(ds, augment_eval)
    h, w, c = ds.image_shape
    k = max(1, min(k, len(ds.classes)))

    def classify(payload: dict | None):
        upload = upload_source(payload)
        if upload is None or upload == "":
            return None
        # the uploaded file's own name (Gradio keeps it), or "image" for one sent inline
        name = "image" if isinstance(upload, bytes) else Path(upload).name
        try:
            # as bytes (Gradio capped uploads at MAX_BYTES), so that no message names a server path
            blob = upload if isinstance(upload, bytes) else Path(upload).read_bytes()
            x = preprocess(blob, ds, augment_eval, transform, name=name)
            release_memory()  # after a large image, the page's server gives the decoding memory back
        except OSError:
            raise gr.Error(f"{name}: the upload cannot be read, try again", print_exception=False) from None
        except ImageError as exc:
            message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
            raise gr.Error(message, title="This image cannot be classified", print_exception=False) from None
        return dict(top_k(predict, x, ds.classes, k))

    channels = "grayscale" if c == 1 else "RGB"
    # delete_cache: uploaded images are removed an hour after upload, and all of them when the server stops
    with gr.Blocks(title="onecycle demo", delete_cache=(600, 3600)) as demo:  # analytics off: onecycle.OFFLINE_DEFAULTS
        gr.Markdown(
            f"## onecycle demo: {ds.name}\n"
            f"Upload or drop an image, paste one, or pick an example from the test split: the model answers "
            f"with its top {k} of {len(ds.classes)} classes. Images are converted to {channels} {w}x{h} "
            f"and preprocessed exactly as `onecycle predict` does." + (f"\n\nModel: `{source}`" if source else ""))
        with gr.Row(equal_height=False):
            with gr.Column():
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=320,
                                 elem_id="input-image")
            with gr.Column():
                label = gr.Label(num_top_classes=k, label=f"Top {k} classes", elem_id="top-classes")
        if examples:
            gr.Examples([str(e.path) for e in examples], inputs=image, cache_examples=False, elem_id="examples",
                        label="Examples from the test split, in order: " + ", ".join(e.label for e in examples),
                        examples_per_page=max(10, len(examples)))
        # preprocess=False: the handler gets the upload's file data, not an image Gradio opened (upload_source)
        image.change(classify, inputs=image, outputs=label, api_name="classify", show_progress="minimal",
                     preprocess=False)
    return demo


def theme():
    """Gradio's default look with the system fonts: the page loads no font from anywhere."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "Consolas", "monospace"])


def launch(demo, host: str | None = None, port: int | None = None, quiet: bool = False):
    """Serve ``demo`` (blocking). ``None`` host/port: GRADIO_SERVER_NAME/PORT or 127.0.0.1:7860 (as on Spaces)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup requests, at INFO
    # run_history=False: no record of the images people try, and no page offering to upload them elsewhere
    return demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, quiet=quiet,
                       max_file_size=MAX_BYTES, theme=theme(), css=CSS, show_error=False, run_history=False,
                       footer_links=["api", "gradio", "settings"])
