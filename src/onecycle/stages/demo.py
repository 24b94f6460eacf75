"""demo: a web page to try the trained model: upload or drop an image, see its top classes with probabilities.

``onecycle demo`` serves a Gradio page on loopback (``--host`` widens it deliberately, ``--port`` picks the
port) for ``models/model.pt`` or a registered MLflow model (``--model-uri models:/NAME@ALIAS``). Images go
through :mod:`onecycle.serving.inference` exactly as with ``onecycle predict``: the same model loading, the same
guard (too large, a decompression bomb, truncated or not an image: refused before decoding, with a message
on the page, and the server keeps answering) and the same eval transforms. A few images of the fetched
dataset's test split are offered as examples (written as PNGs into a temporary folder, never into the
repository).

``onecycle demo --export-space DIR`` writes a self-contained Hugging Face Space (Gradio SDK): ``app.py``,
pinned ``requirements.txt``, the model file, the example images and a copy of this package's source, so
the Space needs no install of onecycle from source control. ``python app.py`` in that folder runs it.

This module owns the command, the page (:func:`build_demo`), the example images and the Space export.
Telemetry is off, as everywhere in onecycle (a value the user set wins; ONECYCLE_TELEMETRY=1 opts back in):
Gradio's analytics and the Hugging Face Hub's telemetry, before gradio is imported. The page uses the
system fonts, and nothing is fetched from outside the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onecycle.core.errors import OneCycleError
from onecycle.data import catalog
from onecycle.data.images import MAX_BYTES, ImageError, release_memory
from onecycle.serving.inference import eval_transform, load_predictor, preprocess, top_k
from onecycle.stages.command import run_command

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 7860  # Gradio's, and what Hugging Face Spaces expects
SPACE_CONFIG = "demo.json"
# What an exported Space installs besides gradio (its version is the Space's sdk_version): the running
# environment's versions of these are written into its requirements.txt.
# albumentations only for a model whose augment.eval lists more than resize/crop (onecycle.serving.preprocessing)
SPACE_REQUIREMENTS = ("torch", "torchvision", "numpy", "pillow", "pydantic", "pyyaml")
# Spaces' free hardware is CPU: the CPU build of torch is a fraction of the CUDA one's size.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CSS = """
#input-image img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
#examples .gallery-item .container, #examples .gallery-item img { width: 56px; height: 56px; object-fit: contain; }
"""


@dataclass
class Example:
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


# ----------------------------------------------------------------------------------------------- Spaces

def space_demo(folder: Path):
    """The demo of an exported Space folder: its model file, examples and settings (``demo.json``)."""
    import torch

    folder = Path(folder)
    cfg = json.loads((folder / SPACE_CONFIG).read_text())
    predict, ds, augment_eval = load_predictor(folder / cfg["model"], None, torch.device("cpu"),
                                               tta=cfg.get("tta", "none"))
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

from onecycle.stages.demo import launch, space_demo  # noqa: E402

demo = space_demo(HERE)

if __name__ == "__main__":
    launch(demo)
'''


def space_requirements(gradio_version: str, eval_spec: Sequence = ()) -> list[str]:
    """The Space's requirements.txt: the versions running here, each within gradio's own range for it.

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
    lines = [f"--extra-index-url {TORCH_CPU_INDEX}", f"gradio=={gradio_version}"]
    for name in SPACE_REQUIREMENTS + (("albumentations",) if needs_albumentations(list(eval_spec)) else ()):
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
        "(`model.pt`), the example images and the onecycle package's source (`onecycle/`). "
        "Run it locally with `pip install gradio==" + gradio_version + " -r requirements.txt && python app.py`.\n"
    )


def export_space(out: Path, model_path: Path, ds, examples: Sequence[Example], k: int, source: str,
                 eval_spec: Sequence = (), tta: str = "none") -> Path:
    """Write a Hugging Face Space folder (Gradio SDK) that runs this demo without onecycle installed."""
    import gradio

    import onecycle

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / SPACE_CONFIG).is_file():
        raise OneCycleError(f"{out} exists and is not an exported Space: choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    package = Path(onecycle.__file__).resolve().parent
    shutil.rmtree(out / "onecycle", ignore_errors=True)
    shutil.copytree(package, out / "onecycle", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copyfile(model_path, out / "model.pt")
    shutil.rmtree(out / "examples", ignore_errors=True)
    (out / "examples").mkdir()
    listed = []
    for e in examples:
        shutil.copyfile(e.path, out / "examples" / e.path.name)
        listed.append({"file": f"examples/{e.path.name}", "label": e.label})
    cfg = {"model": "model.pt", "top_k": k, "examples": listed, "source": source, "tta": tta}
    (out / SPACE_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "app.py").write_text(APP_PY)
    (out / "requirements.txt").write_text("\n".join(space_requirements(gradio.__version__, eval_spec)) + "\n")
    (out / "README.md").write_text(space_readme(ds, gradio.__version__))
    # Hugging Face stores binary files with Xet/LFS; `hf upload` does it by itself, git needs this line.
    (out / ".gitattributes").write_text("*.pt filter=lfs diff=lfs merge=lfs -text\n"
                                        "*.png filter=lfs diff=lfs merge=lfs -text\n")
    return out


# ----------------------------------------------------------------------------------------------- the command

def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _add_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, default=Path("models/model.pt"), help="model file (default: models/model.pt)")
    src.add_argument("--model-uri", help="an MLflow model URI, e.g. models:/onecycle-resnet@champion")
    p.add_argument("-k", "--top-k", type=int, default=5, help="classes to show (default 5)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--examples", type=int, default=10, metavar="N",
                   help="example images taken from the fetched test split, one per class first (default 10; 0: none)")
    p.add_argument("--export-space", type=Path, metavar="DIR",
                   help="write a Hugging Face Space (app.py, requirements.txt, model, examples) into DIR and exit")


def _run(params, args) -> int:
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill`: stop as Ctrl-C does, temporary files removed
    try:
        return _serve(params, args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve(params, args) -> int:
    if args.export_space and args.model_uri:
        raise OneCycleError("--export-space copies a model file: use --model (the file train writes), not --model-uri")
    if not 1 <= args.port <= 65535:
        raise OneCycleError(f"--port {args.port} is not a TCP port (1-65535)")
    from onecycle.training.engine import resolve_device

    device = resolve_device(params.train.device)
    predict, ds, augment_eval = load_predictor(args.model, args.model_uri, device, tta=params.evaluate.tta)
    source = args.model_uri or str(args.model)
    data_dir = Path(params.data.root).expanduser() / ds.name
    with tempfile.TemporaryDirectory(prefix="onecycle-demo-") as tmp:
        examples = write_examples(data_dir, list(ds.classes), Path(tmp), args.examples)
        if args.export_space:
            out = export_space(args.export_space, args.model, ds, examples, args.top_k, source,
                               augment_eval or catalog.kind(ds.name).eval_spec(), tta=params.evaluate.tta)
            print(f"onecycle demo: wrote a Hugging Face Space into {out}/ ({len(examples)} example images); "
                  f"try it with `cd {out} && python app.py`", flush=True)
            return 0
        demo = build_demo(predict, ds, augment_eval, k=args.top_k, examples=examples, source=source)
        if args.host not in LOOPBACK:
            print(f"onecycle demo: note: listening on {args.host}, not loopback: anyone who can reach this "
                  f"machine on port {args.port} can use the page", file=sys.stderr)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"onecycle demo: {source} on http://{shown}:{args.port}/ (Ctrl-C stops it)", flush=True)
        try:
            launch(demo, args.host, args.port, quiet=True)
        except OSError as exc:
            raise OneCycleError(f"cannot serve on {args.host}:{args.port}: {' '.join(str(exc).split())}") from None
    return 0


def main(argv=None) -> int:
    return run_command("demo", __doc__.splitlines()[0], argv, _run, _add_args, params_optional=True)


if __name__ == "__main__":
    raise SystemExit(main())
