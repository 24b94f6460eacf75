"""demo: a web page to try the trained model: upload or drop an image, see its top classes with probabilities.

``onecycle demo`` serves the page of :mod:`onecycle.serving.demo_app` on loopback (``--host`` widens it
deliberately, ``--port`` picks the port) for ``models/model.pt`` or a registered MLflow model (``--model-uri
models:/NAME@ALIAS``). Images go through :mod:`onecycle.serving.inference` exactly as with ``onecycle predict``.
A few images of the fetched dataset's test split are offered as examples (written as PNGs into a temporary
folder, never into the repository).

``onecycle demo --export-space DIR`` writes a self-contained Hugging Face Space instead
(:mod:`onecycle.serving.space_export`); ``python app.py`` in that folder runs it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from onecycle.core.errors import OneCycleError
from onecycle.data import catalog
from onecycle.serving.demo_app import DEFAULT_PORT, build_demo, launch, write_examples
from onecycle.serving.inference import load_predictor
from onecycle.serving.provenance import describe
from onecycle.serving.space_export import export_space
from onecycle.stages.command import run_command

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _add_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, default=Path("models/model.pt"), help="model file (default: models/model.pt)")
    src.add_argument("--model-uri", help="an MLflow model URI, e.g. models:/onecycle-fashion_mnist@champion")
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
    # train.device matters to a torch model only: a model.onnx (the registered model's) runs on ONNX Runtime
    predict, ds, augment_eval = load_predictor(args.model, args.model_uri, params.train.device, tta=params.evaluate.tta)
    print(f"onecycle demo: answering with {describe(args.model, args.model_uri)}", flush=True)
    source = args.model_uri or str(args.model)
    data_dir = Path(params.data.root).expanduser() / ds.name
    with tempfile.TemporaryDirectory(prefix="onecycle-demo-") as tmp:
        examples = write_examples(data_dir, list(ds.classes), Path(tmp), args.examples)
        if args.export_space:
            out = export_space(args.export_space, args.model, ds, examples, args.top_k, source,
                               augment_eval or catalog.kind(ds.name).eval_spec(ds.image_shape[0]), tta=params.evaluate.tta)
            print(f"onecycle demo: wrote a Hugging Face Space into {out}/ ({len(examples)} example images); "
                  f"try it with `cd {out} && python app.py`", flush=True)
            return 0
        demo = build_demo(predict, ds, augment_eval, k=args.top_k, examples=examples, source=source)
        if args.host not in LOOPBACK:
            print(f"onecycle demo: note: listening on {args.host}, not loopback: anyone who can reach this "
                  f"machine on port {args.port} can use the page", file=sys.stderr)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"onecycle demo: {source} on http://{shown}:{args.port}/ (Ctrl-C stops it)", flush=True)

        stopping = []

        def stop(signum, frame):  # Ctrl-C or `kill`: close the server (Gradio reports an interrupt in its own words)
            stopping.append(signum)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts at once
            demo.close(verbose=False)

        signal.signal(signal.SIGTERM, stop)
        previous = signal.signal(signal.SIGINT, stop)
        try:
            launch(demo, args.host, args.port, quiet=True)
        except Exception as exc:
            if stopping:  # stopped while Gradio was starting: its start-up check fails on the closed server
                pass
            elif isinstance(exc, OSError):
                raise OneCycleError(f"cannot serve on {args.host}:{args.port}: {' '.join(str(exc).split())}") from None
            else:
                raise
        finally:
            signal.signal(signal.SIGINT, previous)
    print("onecycle demo: stopped", flush=True)
    return 0


def main(argv=None) -> int:
    return run_command("demo", __doc__.splitlines()[0], argv, _run, _add_args, params_optional=True)


if __name__ == "__main__":
    raise SystemExit(main())
