"""The ``onecycle`` command line: help, dispatch, the fetch stage and its exit codes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON
from onecycle.cli import main


def onecycle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "onecycle", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands(tmp_path):
    proc = onecycle("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "One Cycle" in proc.stdout
    commands = [line.split()[0] for line in proc.stdout.split("commands:", 1)[1].splitlines() if line.startswith("  ")]
    assert commands[:4] == ["fetch", "lr-find", "train", "evaluate"]


def test_no_command_prints_help_and_succeeds(capsys):
    assert main([]) == 0
    assert "fetch" in capsys.readouterr().out


def test_an_unknown_command_exits_2(tmp_path):
    proc = onecycle("bogus", "--params", "x.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "invalid choice: 'bogus'" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_fetch_help_names_the_params_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fetch", "--help"])
    assert info.value.code == 0
    assert "--params PATH" in capsys.readouterr().out


def test_fetch_with_a_missing_params_file_exits_2(tmp_path, capsys):
    assert main(["fetch", "--params", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"onecycle fetch: error: params file {tmp_path / 'nope.yaml'} not found (pass --params PATH)"]


def test_fetch_an_image_folder_twice(tmp_path, image_folder, write_params):
    params = write_params(tmp_path, data={"dataset": "imagefolder", "source": str(image_folder)})
    first = onecycle("fetch", "--params", str(params), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "data" / "imagefolder"
    assert first.stdout.startswith(f"fetched imagefolder -> {out} (9 train / 6 test images, 3 classes, 30x30x3, from ")
    meta = (out / "meta.json").read_text()
    second = onecycle("fetch", "--params", str(params), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith(f"up to date: imagefolder -> {out} (9 train / 6 test images")
    assert (out / "meta.json").read_text() == meta


def test_fetch_fashion_mnist_in_process_twice(tmp_path, fashion_checksums, write_params, capsys):
    params = write_params(tmp_path, data={"source": str(fashion_checksums.folder)})
    assert main(["fetch", "--params", str(params)]) == 0
    out = tmp_path / "data" / "fashion_mnist"
    assert capsys.readouterr().out == (f"fetched fashion_mnist -> {out} (12 train / 6 test images, 10 classes, "
                                       f"28x28x1, from {fashion_checksums.folder})\n")
    assert json.loads((out / "meta.json").read_text())["num_train"] == 12
    assert main(["fetch", "--params", str(params)]) == 0
    assert capsys.readouterr().out.startswith(f"up to date: fashion_mnist -> {out} (12 train / 6 test images")


def test_a_dataset_error_exits_1_with_one_line(tmp_path, fashion_source, write_params, capsys):
    params = write_params(tmp_path, data={"source": str(fashion_source.folder)})  # checksums not patched
    assert main(["fetch", "--params", str(params)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onecycle fetch: error: checksum mismatch for ")
    assert captured.out == "" and not (tmp_path / "data" / "fashion_mnist").exists()
