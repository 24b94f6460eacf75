"""``onecycle demo``: the page is started on a free loopback port and driven over HTTP as the browser does.

The page's own calls, in order: ``POST /gradio_api/upload`` (multipart) stores the image and answers its
server path; ``POST /gradio_api/queue/join`` asks for the ``classify`` event with that file; ``GET
/gradio_api/queue/data`` streams the answer (server-sent events) until ``process_completed``. Answers
are compared with ``onecycle predict --json`` on the same PNG. The model is built and saved directly
(no training): an untrained network still has one deterministic answer per image.

The exported Hugging Face Space is run the same way, with ``python app.py`` in its folder.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # the offline hook lives with the e2e tests
from test_offline import Offline  # noqa: E402

pytestmark = pytest.mark.slow  # each server takes 10-20 s to start on 2 cores

PYTHON = sys.executable
TOP_K = 4


# ----------------------------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a server: none of the telemetry switches (onecycle's defaults must do it), and the
    project's offline hook, which records and refuses every connection or DNS lookup leaving the machine."""
    offline = Offline(tmp)
    env = {k: v for k, v in offline.env().items() if not k.startswith(("GRADIO_", "HF_HUB_"))}
    env.update(GRADIO_TEMP_DIR=str(tmp / "gradio-uploads"), PYTHONUNBUFFERED="1", **extra)
    return env


def outbound(tmp: Path) -> list[dict]:
    """What the servers started with ``server_env(tmp)`` tried to reach outside the machine."""
    return Offline(tmp).calls()


class Page:
    """A running demo server, driven through the page's own HTTP calls."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str], port: int, log: Path):
        """Start the server; :meth:`wait` waits until it answers (other work can be done meanwhile)."""
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 300) -> Page:
        """The page's configuration, as the browser reads it first: the classify event's index and trigger."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"the demo exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/config", timeout=5) as r:
                    self.config = json.load(r)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"the demo did not answer within {timeout} s:\n{self.log.read_text()}") from None
                time.sleep(0.5)
        self.fn_index, self.trigger_id = next(
            (d["id"], d["targets"][0][0]) for d in self.config["dependencies"] if d.get("api_name") == "classify")
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()

    def upload(self, name: str, blob: bytes) -> dict:
        """What the page does when a file is dropped: store it, get the server path of the upload."""
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + blob + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(f"{self.url}/gradio_api/upload?upload_id={uuid.uuid4().hex[:11]}", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            (path,) = json.load(r)
        return {"path": path, "orig_name": name, "size": len(blob), "mime_type": "image/png",
                "meta": {"_type": "gradio.FileData"}}

    def classify(self, name: str, blob: bytes) -> dict:
        """Upload, then the ``change`` event the image input fires: join the queue, read the event stream."""
        return self.run(self.upload(name, blob))

    def run(self, file: dict) -> dict:
        """The ``classify`` event for one file value, as the page sends it; the ``process_completed`` message."""
        session = uuid.uuid4().hex[:11]
        join = {"data": [file], "fn_index": self.fn_index, "trigger_id": self.trigger_id, "session_hash": session,
                "event_data": None}
        req = urllib.request.Request(f"{self.url}/gradio_api/queue/join", data=json.dumps(join).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert "event_id" in json.load(r)
        with urllib.request.urlopen(f"{self.url}/gradio_api/queue/data?session_hash={session}", timeout=60) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
        raise AssertionError("the event stream ended without process_completed")


def top(msg: dict) -> list[tuple[str, float]]:
    assert msg["success"], msg
    value = msg["output"]["data"][0]
    return [(c["label"], c["confidence"]) for c in value["confidences"]]


def error(msg: dict) -> str:
    assert msg["success"] is False, msg
    return msg["output"]["error"]


def predict_json(cwd: Path, *paths: Path, model: str = "models/model.pt") -> dict[str, list[tuple[str, float]]]:
    out = subprocess.run([PYTHON, "-m", "onecycle", "predict", "--json", "-k", str(TOP_K), "--model", model,
                          *map(str, paths)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    return {Path(r["image"]).name: [(t["class"], t["probability"]) for t in r["top_k"]] for r in rows}


def png(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def assert_same(page_top, cli_top):
    assert [c for c, _ in page_top] == [c for c, _ in cli_top]
    assert np.allclose([p for _, p in page_top], [p for _, p in cli_top], atol=1e-5)


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder: a tiny fetched dataset, params, an (untrained) models/model.pt and test PNGs."""
    root = tiny.untrained_model_workspace(tmp_path_factory.mktemp("demo"))
    test_x = np.load(root / "data" / "fashion_mnist" / "test_x.npy")
    (root / "pngs").mkdir()
    for i in range(3):
        (root / "pngs" / f"test-{i}.png").write_bytes(png(test_x[i]))
    return root


@pytest.fixture(scope="module")
def cli_answers(project) -> dict[str, list[tuple[str, float]]]:
    return predict_json(project, *sorted((project / "pngs").glob("*.png")))


@pytest.fixture(scope="module")
def page(project, request):
    """``onecycle demo`` on a free loopback port, in the project folder (a port taken meanwhile: tried again).

    ``onecycle predict`` answers the test PNGs while the server starts.
    """
    for attempt in range(3):
        port = free_port()
        log = project / f"demo-{attempt}.log"
        p = Page([PYTHON, "-m", "onecycle", "demo", "--port", str(port), "-k", str(TOP_K)], project,
                 server_env(project), port, log)
        request.getfixturevalue("cli_answers")
        try:
            p.wait()
            break
        except AssertionError:
            if attempt == 2 or "Cannot find empty port" not in log.read_text():
                raise
    yield p
    p.stop()


# ----------------------------------------------------------------------------------------------- tests

def test_upload_answers_as_predict_does(page, project, cli_answers):
    for path in sorted((project / "pngs").glob("*.png")):
        answer = top(page.classify(path.name, path.read_bytes()))
        assert len(answer) == TOP_K
        assert_same(answer, cli_answers[path.name])


def test_bad_files_get_a_message_and_the_server_keeps_answering(page, project, cli_answers):
    good = project / "pngs" / "test-0.png"
    blob = good.read_bytes()
    # the messages name the uploaded file, never where the server keeps it
    assert error(page.classify("broken.png", b"not an image")) == "broken.png: not a readable image (cannot identify image file)"
    assert error(page.classify("cut.png", blob[: len(blob) // 2])) == "cut.png: not a readable image (image file is truncated)"
    # too many pixels: refused from the header, before decoding (the same guard and message as predict)
    msg = error(page.classify("huge.png", png_header_only(8000, 8000)))
    assert "huge.png: refused, 8000x8000 pixels is more than 50 megapixels" in msg
    # an image sent inline (a data: URL, as API clients may) meets the same guard
    inline = {"url": "data:image/png;base64," + base64.b64encode(png_header_only(8000, 8000)).decode(),
              "meta": {"_type": "gradio.FileData"}}
    assert error(page.run(inline)) == "image: refused, 8000x8000 pixels is more than 50 megapixels"
    inline["url"] = "data:image/png;base64," + base64.b64encode(blob).decode()
    assert_same(top(page.run(inline)), cli_answers[good.name])
    assert_same(top(page.classify(good.name, blob)), cli_answers[good.name])
    assert page.proc.poll() is None


def test_page_offers_test_images_and_loads_nothing_from_outside(page, project):
    cfg = page.config
    dataset = next(c for c in cfg["components"] if c["type"] == "dataset")
    samples = dataset["props"]["samples"]
    assert len(samples) == 10  # one per class, in class order
    assert dataset["props"]["label"].endswith(", ".join(f"class{i}" for i in range(10)))
    assert all(s[0]["orig_name"].endswith(".png") for s in samples)
    assert cfg["stylesheets"] == [] and "googleapis" not in json.dumps(cfg["theme"] if "theme" in cfg else "")
    assert cfg["analytics_enabled"] is False
    with urllib.request.urlopen(page.url + "/", timeout=30) as r:
        html = r.read().decode()
    assert "fonts.googleapis" not in html and "cdn." not in html
    assert outbound(project) == []  # starting, serving the page, answering uploads: no call left the machine



def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                found.add(addr)
    return found


def test_the_page_listens_on_loopback_only(page):
    if not Path("/proc/net/tcp").is_file():
        pytest.skip("no /proc/net/tcp on this system")
    port = int(page.url.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, and nothing else


@pytest.fixture()
def in_project(project, monkeypatch):
    """Run ``onecycle demo`` in this process, in the project folder (its environment changes are undone)."""
    monkeypatch.chdir(project)
    for name in ("GRADIO_ANALYTICS_ENABLED", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    from onecycle.stages import demo

    return demo.main


def test_export_space_runs_without_the_installed_package(in_project, project, cli_answers, tmp_path):
    space = tmp_path / "space"
    assert in_project(["--export-space", str(space), "-k", str(TOP_K)]) == 0
    names = {p.name for p in space.iterdir()}
    assert {"app.py", "requirements.txt", "README.md", "model.onnx", "examples", "onecycle", "demo.json"} <= names
    assert "model.pt" not in names
    assert len(list((space / "examples").glob("*.png"))) == 10
    reqs = (space / "requirements.txt").read_text().splitlines()
    import gradio

    assert f"gradio=={gradio.__version__}" in reqs and any(r.startswith("onnxruntime==") for r in reqs)
    assert not [r for r in reqs if r.startswith(("torch", "--extra-index-url"))], reqs  # ONNX Runtime, no torch
    assert f"sdk_version: {gradio.__version__}" in (space / "README.md").read_text()
    port = free_port()
    app = Page([PYTHON, "app.py"], space, server_env(tmp_path, GRADIO_SERVER_PORT=str(port)), port,
               tmp_path / "space.log")
    try:
        # the Space imports the copied package, not the installed one
        where = subprocess.run([PYTHON, "-c", "import sys; sys.path.insert(0, '.'); import onecycle; print(onecycle.__file__)"],
                               cwd=space, capture_output=True, text=True, env=server_env(tmp_path), timeout=60)
        assert Path(where.stdout.strip()).resolve().is_relative_to(space.resolve()), where
        app.wait()
        good = project / "pngs" / "test-1.png"
        assert_same(top(app.classify(good.name, good.read_bytes())), cli_answers[good.name])
        assert "not a readable image" in error(app.classify("x.png", b"\x89PNG\r\n\x1a\n"))
    finally:
        app.stop()
    assert outbound(tmp_path) == []


def test_command_errors_are_one_line(in_project, capsys):
    assert in_project(["--model", "missing.pt", "--port", str(free_port())]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "onecycle demo: error: missing.pt does not exist: run `onecycle train` (or `dvc repro train`) first"]
    assert in_project(["--model-uri", "models:/x@y", "--export-space", "s"]) == 1
    assert "--export-space copies a model file" in capsys.readouterr().err
    assert in_project(["--port", "70000"]) == 1
    assert "--port 70000 is not a TCP port" in capsys.readouterr().err
