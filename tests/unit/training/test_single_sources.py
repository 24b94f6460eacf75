"""One home per piece of knowledge: the one_cycle policy equals torch's OneCycleLR step for step, the
per-epoch record drives history.csv and the MLflow metrics, and every dataset record is complete."""

from __future__ import annotations

import csv
import io

import pytest
import torch

from onecycle.config import parse_params
from onecycle.data import catalog
from onecycle.training import records
from onecycle.training.engine import build_optimizer
from onecycle.training.schedule import (
    build_scheduler,
    current_momentum,
    lr_and_momentum_at,
    peak_fraction,
    resolve_pct_start,
)


@pytest.mark.parametrize("schedule", [
    {},
    {"anneal_strategy": "linear", "cycle_momentum": False},
    {"three_phase": True, "pct_start": 0.3},
    {"peak_epoch": 1, "div_factor": 40, "final_div_factor": 1},
    {"three_phase": True, "anneal_strategy": "linear", "base_momentum": 0.8, "max_momentum": 0.9},
])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_cycle_is_torchs_onecyclelr_step_for_step(schedule, optimizer):
    params = parse_params({"schedule": {"max_lr": 0.4, **schedule}, "optimizer": {"name": optimizer},
                           "train": {"epochs": 3}})
    s, max_lr, epochs, steps_per_epoch = params.schedule, 0.4, 3, 7
    ours = build_optimizer(params.optimizer, torch.nn.Linear(2, 2), lr=max_lr / s.div_factor)
    torchs = build_optimizer(params.optimizer, torch.nn.Linear(2, 2), lr=max_lr / s.div_factor)
    scheduler = build_scheduler(ours, s, max_lr, epochs, steps_per_epoch)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        torchs, max_lr=max_lr, total_steps=epochs * steps_per_epoch, pct_start=resolve_pct_start(s, epochs),
        anneal_strategy=s.anneal_strategy, cycle_momentum=s.cycle_momentum, base_momentum=s.base_momentum,
        max_momentum=s.max_momentum, div_factor=s.div_factor, final_div_factor=s.final_div_factor,
        three_phase=s.three_phase)
    own = params.optimizer.betas[0] if optimizer == "adamw" else params.optimizer.momentum
    for step in range(epochs * steps_per_epoch):
        expected = (torchs.param_groups[0]["lr"], current_momentum(torchs))
        assert (ours.param_groups[0]["lr"], current_momentum(ours)) == expected, step  # exactly, not approx
        assert lr_and_momentum_at(s, max_lr, epochs, steps_per_epoch, step, own) == expected, step
        for opt in (ours, torchs):
            opt.step()
        scheduler.step()
        reference.step()


def test_the_peak_fraction_is_pct_start_or_the_peak_epoch():
    plain = parse_params({}).schedule
    assert peak_fraction(plain, 4) == 0.25 and peak_fraction(plain, 4, 0.5) == 0.5
    peaked = parse_params({"schedule": {"peak_epoch": 5}, "train": {"epochs": 24}}).schedule
    assert peak_fraction(peaked, 24) == 5 / 24 and peak_fraction(peaked, 24, 0.5) == 5 / 24
    assert peak_fraction(peaked, 4) == 1.0  # a trial shorter than the peak epoch warms up throughout


def _result(**over) -> records.EpochResult:
    fields = {"epoch": 2, "train": {"loss": 0.5, "top1": 0.8, "images": 1000, "seconds": 4.0},
              "val": {"loss": 0.6, "top1": 0.75, "top5": 0.99},
              "steps": [records.Step(10, 0.1, 0.9), records.Step(11, 0.05, 0.92)], "seconds": 5.12345}
    return records.EpochResult(**{**fields, **over})


def test_the_epoch_record_drives_history_csv_and_the_mlflow_metrics():
    row = records.epoch_row(_result())
    assert list(row) == records.HISTORY_COLUMNS
    assert row["epoch"] == 3 and row["lr"] == 0.05 and row["momentum"] == 0.92
    assert row["epoch_seconds"] == 5.123 and row["images_per_second"] == 250.0
    assert records.row_metrics(row) == {"train/loss": 0.5, "train/top1": 0.8, "val/loss": 0.6, "val/top1": 0.75,
                                        "val/top5": 0.99, "wall_clock/epoch_seconds": 5.123,
                                        "wall_clock/images_per_second": 250.0}
    (parsed,) = csv.DictReader(io.StringIO(records.history_csv([row])))
    assert list(parsed) == records.HISTORY_COLUMNS and float(parsed["val_top1"]) == 0.75
    no_val = records.epoch_row(_result(val={}))
    assert no_val["val_top1"] is None and "val/top1" not in records.row_metrics(no_val)


def test_schedule_csv_reads_steps_by_name():
    steps = [records.Step(i, 0.1 * i, 0.9) for i in range(3)]
    assert records.schedule_csv(steps).splitlines() == ["step,lr,momentum", "0,0.0,0.9", "1,0.1,0.9",
                                                        "2,0.2,0.9"]


def test_every_dataset_record_is_complete_and_config_takes_exactly_the_catalog():
    for name, kind in catalog.KINDS.items():
        assert kind.name == name and callable(kind.fetch_function())
        assert kind.train_spec(32) and (kind.batch_recipe is not None) != kind.image_folder
        assert parse_params({"data": {"dataset": name, "source": "images/x"}}).data.dataset == name
    with pytest.raises(Exception, match=r"data\.dataset must be one of"):
        parse_params({"data": {"dataset": "mnist"}})


def test_the_standard_recipes_are_the_published_ones():
    assert catalog.kind("fashion_mnist").train_spec(28) == [
        {"PadIfNeeded": {"min_height": 32, "min_width": 32, "border_mode": 0, "fill": 0}},
        {"RandomCrop": {"height": 28, "width": 28}}, {"HorizontalFlip": {"p": 0.5}}]
    assert catalog.kind("cifar10").train_spec(32) == [
        {"PadIfNeeded": {"min_height": 40, "min_width": 40, "border_mode": 4}},
        {"RandomCrop": {"height": 32, "width": 32}}, {"HorizontalFlip": {"p": 0.5}},
        {"CoarseDropout": {"num_holes_range": [1, 1], "hole_height_range": [8, 8], "hole_width_range": [8, 8],
                           "p": 1.0}}]
    assert catalog.kind("imagefolder").eval_spec() == [{"SmallestMaxSize": {"max_size": 256}},
                                                       {"CenterCrop": {"height": 224, "width": 224}}]
