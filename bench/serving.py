"""Serving benchmark: ``mlflow models serve`` of the image classifier on ONNX Runtime vs torch, over loopback.

One run measures, for each runtime, the classifier publish logs (``serving.publish.log_classifier``: the ONNX export
checked against torch, or the model file on torch), logged into a temporary MLflow store (never the project's):

* the served environment's size: a fresh ``python -m venv`` with ``pip install -r`` of the model's own
  requirements.txt, from the package registry (``--venv``; without one, the same distributions summed from this
  environment's file lists, as ``bench/served_env.py`` does); its size without the CUDA libraries too;
* a server's start-up: seconds from ``mlflow models serve`` (of that environment, or this one) to its first
  ``/ping``;
* images/s and p50/p99 latency per request at concurrency 1 and 16, with requests of 1 and 64 PNGs (the fetched
  test split's images, or synthetic ones), each row bounded by ``--requests`` and ``--seconds``;
* evaluate's in-process rate for the same model and test-time augmentation (``training.engine.evaluate``).

``python bench/serving.py`` benchmarks ``models/model.pt`` with ``evaluate.tta`` from ./params.yaml (the fetched
test split's images); ``--tiny`` an untrained tiny model on synthetic images with a few requests per row, to check
the script. The goals it reports: the ONNX environment <= 500 MiB, ONNX Runtime's images/s >= torch's at every
row, and batch-64 images/s within 2x of evaluate's in-process rate. Figures only, no assertions; ``--json`` writes
them too. Run it on a quiet machine: the servers and the clients share its cores.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RUNTIMES = ("onnxruntime", "torch")
ROWS = [(1, 1), (1, 64), (16, 1), (16, 64)]  # (concurrent clients, PNGs per request)
CUDA = re.compile(r"^(nvidia|cuda|triton)")  # site-packages entries of torch's CUDA libraries


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _cpu() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------------------------- the model

def tiny_model(folder: Path) -> Path:
    """An untrained tiny Fashion-MNIST model file (``--tiny``)."""
    from types import SimpleNamespace

    from onecycle.config import parse_params
    from onecycle.serving.modelfile import save_model
    from onecycle.training.models import build_model

    params = parse_params({"model": {"width": 0.125}})
    info = SimpleNamespace(name="fashion_mnist", classes=[f"class{i}" for i in range(10)], image_shape=(28, 28, 1),
                           mean=[0.29], std=[0.35])
    path = folder / "model.pt"
    save_model(params.model, params.augment, info, build_model(params.model, 10, 1).state_dict(), path)
    return path


def sample_images(model_file: Path, params, n: int) -> list[np.ndarray]:
    """Up to ``n`` uint8 HWC images: the fetched test split's when there is one for this model, else synthetic."""
    from onecycle.training import checkpoint as ckpt

    ds = ckpt.load(model_file)["dataset"]
    arrays = Path(params.data.root).expanduser() / ds["name"] / "test_x.npy" if params is not None else None
    if arrays is not None and arrays.is_file():
        x = np.load(arrays, mmap_mode="r")
        if list(x.shape[1:]) == list(ds["image_shape"]):
            return [np.asarray(x[i]) for i in range(min(n, len(x)))]
    h, w, c = ds["image_shape"]
    return list(np.random.default_rng(0).integers(0, 256, (n, h, w, c), dtype=np.uint8))


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def evaluate_rate(model_file: Path, images: list[np.ndarray], tta: str, batch: int = 256, seconds: float = 5.0) -> float:
    """evaluate's images/s in process: ``training.engine.evaluate`` of the model on the images, normalized as its
    loader does, fp32 on the CPU."""
    import torch

    from onecycle.serving.inference import eval_transform, preprocess
    from onecycle.serving.modelfile import load_model_bundle
    from onecycle.training.engine import evaluate

    model, ds, bundle = load_model_bundle(model_file, "cpu")
    transform = eval_transform(ds, bundle["augment_eval"])
    x = torch.from_numpy(np.stack([preprocess(png(i), ds, bundle["augment_eval"], transform) for i in images]))
    batches = [(x[i:i + batch], torch.zeros(len(x[i:i + batch]), dtype=torch.long)) for i in range(0, len(x), batch)]
    evaluate(model, batches[:1], torch.device("cpu"), None, tta=bundle.get("tta", tta))  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n == 0:
        n += evaluate(model, batches, torch.device("cpu"), None, tta=bundle.get("tta", tta))["n"]
    return n / (time.perf_counter() - start)


def log_models(model_file: Path, tta: str, store: Path) -> dict[str, str]:
    """Both classifiers of ``model_file`` logged into a run of a temporary store: runtime -> model URI."""
    import mlflow

    from onecycle.serving.onnx_export import check_onnx, export_onnx
    from onecycle.serving.publish import log_classifier
    from onecycle.training import checkpoint as ckpt

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    # its own artifact folder, active: logged models go to the active experiment, never ./mlruns of the cwd
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("serving-bench",
                                                                 artifact_location=(store / "artifacts").as_uri()))
    with mlflow.start_run() as run:
        pass
    onnx = export_onnx(model_file, store / "model.onnx", tta)
    h, w, c = ckpt.load(model_file)["dataset"]["image_shape"]
    check_onnx(onnx, model_file, [np.random.default_rng(0).standard_normal((64, c, h, w), dtype=np.float32)])
    uris = {"onnxruntime": log_classifier(run.info.run_id, model_file, None, tta, onnx_file=onnx).model_uri,
            "torch": log_classifier(run.info.run_id, model_file, None, tta).model_uri}
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return uris


# ----------------------------------------------------------------------------------------------- environments

def requirements(model_uri: str, store: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    try:
        return Path(mlflow.pyfunc.get_model_dependencies(model_uri))
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def build_venv(reqs: Path, folder: Path) -> tuple[Path, float]:
    """A fresh venv with exactly ``reqs`` installed from the package registry; (its folder, seconds to build)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    subprocess.run([folder / "bin/python", "-m", "pip", "install", "-qq", "--disable-pip-version-check", "--no-input",
                    "-r", str(reqs)], check=True, env=_clean_env(None))
    return folder, time.perf_counter() - start


def venv_size(folder: Path) -> tuple[float, float]:
    """MiB on disk, all of it and without torch's CUDA libraries."""
    total = _du(folder)
    site = next(folder.glob("lib/python*/site-packages"))
    cuda = sum(_du(p) if p.is_dir() else p.stat().st_size for p in site.iterdir() if CUDA.match(p.name))
    return total / 2**20, (total - cuda) / 2**20


def closure_size(reqs: Path) -> tuple[float, float]:
    """The requirements' distributions and their dependencies as installed here, in MiB (all; without CUDA)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from served_env import CUDA as CUDA_DIST
    from served_env import closure

    names = [line.split("==")[0] for line in reqs.read_text().split() if line and not line.startswith("-")]
    sizes = closure(names)
    return (sum(sizes.values()) / 2**20, sum(s for n, s in sizes.items() if not CUDA_DIST.match(n)) / 2**20)


def _clean_env(venv: Path | None, store: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHON", "VIRTUAL_ENV"))}
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv)
    if store is not None:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


# ----------------------------------------------------------------------------------------------- the server

class Server:
    """``mlflow models serve`` of ``model_uri`` on a free loopback port, from ``venv`` (or this environment)."""

    def __init__(self, model_uri: str, store: Path, venv: Path | None, log: Path):
        self.port = _free_port()
        mlflow_cli = (venv / "bin/mlflow") if venv else Path(sys.executable).parent / "mlflow"
        self.log = open(log, "w")
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            [mlflow_cli, "models", "serve", "-m", model_uri, "--env-manager", "local", "--host", "127.0.0.1",
             "--port", str(self.port)], cwd=store, env=_clean_env(venv or Path(sys.executable).parent.parent, store),
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = start + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"mlflow models serve exited with {self.proc.returncode}: see {log}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2)
                break
            except OSError:
                if time.perf_counter() > deadline:
                    self.stop()
                    raise SystemExit(f"mlflow models serve did not answer /ping in 600 s: see {log}") from None
                time.sleep(0.1)
        self.startup = time.perf_counter() - start

    def post(self, body: bytes) -> float:
        """One request; its latency in seconds."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}")
        return time.perf_counter() - t

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()


def load(server: Server, body: bytes, images: int, clients: int, requests: int, seconds: float) -> dict:
    """``clients`` threads sending ``body`` back to back until ``requests`` were sent or ``seconds`` passed."""
    latencies: list[float] = []
    lock = threading.Lock()
    sent = [0]
    deadline = time.perf_counter() + seconds

    def client():
        while True:
            with lock:
                if sent[0] >= requests or time.perf_counter() > deadline:
                    return
                sent[0] += 1
            seconds_taken = server.post(body)
            with lock:
                latencies.append(seconds_taken)

    for _ in range(min(2, requests)):  # warm-up: the first requests pay for lazy initialization
        server.post(body)
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {"requests": len(lat), "images_per_s": len(lat) * images / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}


# ----------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("models/model.pt"), help="model file (default models/model.pt)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="for evaluate.tta and the test images")
    p.add_argument("--tiny", action="store_true", help="an untrained tiny model, synthetic images, few requests")
    p.add_argument("--venv", choices=("both", "onnxruntime", "none"), default="both",
                   help="build fresh venvs of the models' requirements (sizes, and the servers run in them); "
                        "'none' sizes this environment's distributions and serves from it (default both)")
    p.add_argument("--requests", type=int, default=400, help="most requests per row (default 400)")
    p.add_argument("--seconds", type=float, default=30.0, help="most seconds per row (default 30)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the work folder (store, venvs, server logs)")
    args = p.parse_args(argv)

    from onecycle.config import load_params, parse_params

    if not args.tiny and not args.model.is_file():
        p.error(f"{args.model} does not exist: train first (dvc repro), or use --tiny")
    work = Path(tempfile.mkdtemp(prefix="onecycle-serving-bench-"))
    if args.tiny:
        model_file, params = tiny_model(work), None
        tta = parse_params({}).evaluate.tta
        args.requests, args.seconds = min(args.requests, 6), min(args.seconds, 10.0)
    else:
        params = load_params(args.params)
        model_file, tta = args.model.resolve(), params.evaluate.tta
    images = sample_images(model_file, params, 1024)
    print(f"serving benchmark: {model_file} (tta {tta}) on {_cpu()}, python {platform.python_version()}; "
          f"work folder {work}", flush=True)
    try:
        batch = params.data.batch_size if params is not None else "auto"
        return _measure(args, work, model_file, tta, images, batch if isinstance(batch, int) else 256)  # auto: 256
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _measure(args, work: Path, model_file: Path, tta: str, images: list[np.ndarray], eval_batch: int) -> int:
    bodies = {n: json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png(i)).decode()]
                                                                                for i in images[:n]]}}).encode()
              for n in {b for _, b in ROWS}}
    rate = evaluate_rate(model_file, images, tta, eval_batch, seconds=2.0 if args.tiny else 10.0)
    print(f"evaluate in process: {rate:,.0f} images/s (batches of {eval_batch})", flush=True)
    store = work / "store"
    store.mkdir()
    json_out = args.json.resolve() if args.json else None
    os.chdir(work)  # whatever MLflow writes relative to the cwd stays out of the project
    uris = log_models(model_file, tta, store)
    results: dict = {"model": str(model_file), "tta": tta, "cpu": _cpu(), "evaluate_images_per_s": rate,
                     "runtimes": {}}
    for runtime in RUNTIMES:
        reqs = requirements(uris[runtime], store)
        venv = None
        if args.venv == "both" or args.venv == runtime:
            print(f"{runtime}: building a venv of {', '.join(reqs.read_text().split())} ...", flush=True)
            venv, built = build_venv(reqs, work / f"venv-{runtime}")
            (size, no_cuda), how = venv_size(venv), f"fresh venv, built in {built:.0f} s"
        else:
            (size, no_cuda), how = closure_size(reqs), "this environment's distributions"
        server = Server(uris[runtime], store, venv, work / f"serve-{runtime}.log")
        row = {"env_mib": size, "env_mib_without_cuda": no_cuda, "env": how, "startup_s": server.startup,
               "requirements": reqs.read_text().split(), "rows": []}
        print(f"{runtime}: environment {size:,.0f} MiB ({no_cuda:,.0f} without CUDA libraries; {how}); "
              f"server up in {server.startup:.1f} s", flush=True)
        try:
            for clients, batch in ROWS:
                measured = load(server, bodies[batch], batch, clients, args.requests, args.seconds)
                row["rows"].append({"clients": clients, "batch": batch, **measured})
                print(f"  {runtime:<12} concurrency {clients:>2}  batch {batch:>2}: {measured['images_per_s']:8,.0f} "
                      f"images/s  p50 {measured['p50_ms']:7.1f} ms  p99 {measured['p99_ms']:7.1f} ms "
                      f"({measured['requests']} requests)", flush=True)
        finally:
            server.stop()
        results["runtimes"][runtime] = row
    onnx, torch_ = results["runtimes"]["onnxruntime"], results["runtimes"]["torch"]
    print("\n| runtime | concurrency | PNGs per request | images/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|---:|")
    for runtime, row in results["runtimes"].items():
        for r in row["rows"]:
            print(f"| {runtime} | {r['clients']} | {r['batch']} | {r['images_per_s']:,.0f} | {r['p50_ms']:.1f} | "
                  f"{r['p99_ms']:.1f} |")
    faster = all(a["images_per_s"] >= b["images_per_s"] for a, b in zip(onnx["rows"], torch_["rows"], strict=True))
    best64 = max(r["images_per_s"] for r in onnx["rows"] if r["batch"] == 64)
    print(f"\ngoals: ONNX environment {onnx['env_mib']:,.0f} MiB (<= 500: {'yes' if onnx['env_mib'] <= 500 else 'no'}; "
          f"torch's {torch_['env_mib']:,.0f} MiB, {torch_['env_mib_without_cuda']:,.0f} without CUDA); "
          f"ONNX Runtime >= torch at every row: {'yes' if faster else 'no'}; "
          f"batch-64 served {best64:,.0f} images/s vs evaluate's {rate:,.0f} in process: "
          f"{rate / best64:.1f}x ({'within' if rate <= 2 * best64 else 'not within'} 2x); "
          f"start-up {onnx['startup_s']:.1f} s (ONNX Runtime) vs {torch_['startup_s']:.1f} s (torch)")
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
