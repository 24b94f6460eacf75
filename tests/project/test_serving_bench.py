"""bench/serving.py runs every row tiny: both runtimes served by ``mlflow models serve`` on loopback, their
environments sized, the goals reported. The figures themselves come from a quiet machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_serving_bench_measures_every_row_of_both_runtimes_in_tiny_mode(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench/serving.py"), "--tiny", "--venv", "none", "--requests", "3",
                          "--seconds", "5", "--json", str(tmp_path / "serving.json")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    figures = json.loads((tmp_path / "serving.json").read_text())
    assert figures["evaluate_images_per_s"] > 0
    for runtime in ("onnxruntime", "torch"):
        row = figures["runtimes"][runtime]
        assert [(r["clients"], r["batch"]) for r in row["rows"]] == [(1, 1), (1, 64), (16, 1), (16, 64)]
        assert all(r["images_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] for r in row["rows"]), row
        assert row["startup_s"] > 0 and row["env_mib"] > 0
    assert not any(r.startswith("torch") for r in figures["runtimes"]["onnxruntime"]["requirements"])
    assert figures["runtimes"]["onnxruntime"]["env_mib"] < figures["runtimes"]["torch"]["env_mib_without_cuda"]
    assert out.stdout.splitlines()[-1].startswith("goals: ONNX environment ")
    assert not (tmp_path / "mlruns").exists()  # the bench's store stays in its own folder
