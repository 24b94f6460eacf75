"""`onecycle demo` says first which model answers, and stops quietly on Ctrl-C or `kill` (SIGTERM): its own last
line, exit 0, no interrupt report from Gradio."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny fetched dataset, params and an (untrained) models/model.pt."""
    root = tiny.untrained_model_workspace(tmp_path_factory.mktemp("demo-stops"))
    return root


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_the_demo_names_its_model_first_and_stops_quietly(project, signum):
    port = _port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    demo = subprocess.Popen([sys.executable, "-m", "onecycle", "demo", "--port", str(port), "--examples", "0"],
                            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert demo.poll() is None, demo.stdout.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        demo.send_signal(signum)
        out, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    lines = out.splitlines()
    assert demo.returncode == 0, out
    assert lines[0].startswith("onecycle demo: answering with models/model.pt (written "), lines[0]
    assert lines[-1] == "onecycle demo: stopped", out
    assert "Keyboard" not in out and "Traceback" not in out and "Closing server" not in out, out
    assert "warn" not in out.lower(), out
