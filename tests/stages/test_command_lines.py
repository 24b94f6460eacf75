"""What the commands print, in one style: their own lines and their log lines (``train: ...``, ``train: warning:
...``, a library's named), counts in words (``1 epoch``), and ``--help`` without reST markup."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from onecycle.core.words import count
from tiny import tiny_params

BIN = Path(sys.executable).parent


def test_counts_are_written_in_words():
    assert [count(1, "epoch"), count(4, "epoch"), count(0, "step")] == ["1 epoch", "4 epochs", "0 steps"]
    assert [count(1, "class", "classes"), count(3, "class", "classes")] == ["1 class", "3 classes"]


@pytest.mark.parametrize("command", ["promote", "lr-find", "train", "evaluate", "publish", "fetch"])
def test_help_has_no_rest_markup(command):
    out = subprocess.run([BIN / "onecycle", command, "--help"], capture_output=True, text=True, timeout=120).stdout
    description = out.split("\n\n")[1]
    assert description.startswith(command.replace("-", "_")), out
    assert "``" not in description and ":mod:" not in description and "`" not in description, description


LOGS = """
import logging, sys
from onecycle.stages.command import run_command

def body(params, args):
    logging.getLogger("onecycle.stages.example").info("a note")
    logging.getLogger("onecycle.training.example").warning("something to act on")
    logging.getLogger("somelib.sub").warning("the library's own")
    logging.getLogger("somelib.sub").info("the library's chatter")  # below WARNING for libraries: not shown
    logging.getLogger("mlflow.tracking").info("MLflow's chatter")
    print("lr_find: the command's own line")
    return 0

logging.getLogger("somelib").setLevel(logging.WARNING)
sys.exit(run_command("lr-find", "lr_find: an example", ["--params", sys.argv[1]], body))
"""


def test_log_lines_read_like_the_commands_own_lines(tmp_path):
    params = tiny_params(tmp_path)
    proc = subprocess.run([sys.executable, "-c", LOGS, str(params)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["lr_find: a note", "lr_find: warning: something to act on",
                                        "lr_find: warning: somelib: the library's own"]
    assert proc.stdout == "lr_find: the command's own line\n"


@pytest.mark.slow
def test_a_one_epoch_training_says_1_epoch(workdir, capsys):
    from onecycle.stages.train import main

    tiny_params(workdir, train={"epochs": 1})
    assert main(["--params", "params.yaml"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("train: resnet9"))
    assert ", 1 epoch of 8 steps," in line, line
    assert json.loads((workdir / "reports/train.json").read_text())["epochs"] == 1
