"""A new configuration starts fresh with one calm line, and checkpoints/previous/ keeps only the last few."""

from __future__ import annotations

import logging
import os

import torch

from onecycle.config import parse_params
from onecycle.training import checkpoint as ckpt
from onecycle.training.resume import PREVIOUS_KEPT, find_resume_state


def _checkpoint(folder, config_hash: str) -> None:
    ckpt.save({"config_hash": config_hash, "epoch": 1, "mlflow_run_id": None, "model": {"w": torch.zeros(1)}},
              folder / "last.pt")


def test_a_new_configuration_is_a_one_line_note_not_a_warning(tmp_path, caplog):
    train = parse_params({"train": {"device": "cpu"}}).train
    _checkpoint(tmp_path, "old")
    with caplog.at_level(logging.INFO, logger="onecycle"):
        assert find_resume_state(train, "new", tmp_path) is None
    (record,) = [r for r in caplog.records if r.name == "onecycle.training.resume"]
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert message.startswith("new configuration new (") and "\n" not in message
    assert f"move to {tmp_path / 'previous' / 'old'}" in message
    assert (tmp_path / "previous/old/last.pt").is_file() and not (tmp_path / "last.pt").exists()


def test_checkpoints_previous_keeps_the_last_configurations_moved_there(tmp_path):
    train = parse_params({"train": {"device": "cpu"}}).train
    hashes = [f"h{i}" for i in range(PREVIOUS_KEPT + 3)]
    for i, (old, new) in enumerate(zip(hashes, hashes[1:], strict=False)):
        _checkpoint(tmp_path, old)
        assert find_resume_state(train, new, tmp_path) is None
        moved = tmp_path / "previous" / old
        os.utime(moved, (1_000_000 + i, 1_000_000 + i))  # the order they were moved in, whatever the clock's grain
    kept = sorted(p.name for p in (tmp_path / "previous").iterdir())
    assert kept == sorted(hashes[-1 - PREVIOUS_KEPT:-1])  # the most recent PREVIOUS_KEPT, the older ones deleted
