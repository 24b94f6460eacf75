"""The LR range test: exact sweeps, smoothing, suggestions on curves with known answers, divergence, restoration."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from onecycle.config import LRFindConfig, load_params, parse_params
from onecycle.core.errors import ConfigError
from onecycle.training.lr_report import NoDescentError, read_suggestion
from onecycle.training.rangetest import (
    RangeTestResult,
    descends,
    lr_schedule,
    range_test,
    run_range_test,
    smooth_losses,
)
from onecycle.training.suggest import suggest_minimum, suggest_robust, suggest_steepest, suggest_valley
from tiny import tiny_params


def test_exponential_sweep_is_geometric_from_start_to_end():
    lrs = lr_schedule(1e-7, 10.0, 100, "exp")
    assert len(lrs) == 100
    assert lrs[0] == pytest.approx(1e-7, rel=1e-12)
    assert lrs[-1] == pytest.approx(10.0, rel=1e-12)
    ratios = lrs[1:] / lrs[:-1]
    np.testing.assert_allclose(ratios, (10.0 / 1e-7) ** (1 / 99), rtol=1e-12)


def test_linear_sweep_is_evenly_spaced():
    lrs = lr_schedule(0.01, 1.0, 12, "linear")
    np.testing.assert_allclose(lrs, np.linspace(0.01, 1.0, 12), rtol=1e-12)


def test_both_user_recipes_are_expressible():
    sgd = parse_params({"optimizer": {"name": "sgd"}, "lr_find": {"start_lr": 1e-7, "end_lr": 100, "num_iter": 100}})
    lrs = lr_schedule(sgd.lr_find.start_lr, sgd.lr_find.resolved_end_lr, sgd.lr_find.num_iter)
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(100.0)
    adam = parse_params({"optimizer": {"name": "adam"}, "lr_find": {"start_lr": 1e-7, "step_mult": 1.069}})
    cfg = adam.lr_find
    lrs = lr_schedule(cfg.start_lr, cfg.resolved_end_lr, cfg.num_iter)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], 1.069, rtol=1e-9)
    assert lrs[0] == pytest.approx(1e-7)


@pytest.mark.parametrize("section, message", [
    ({"start_lr": 1.0, "end_lr": 0.1}, "lr_find.start_lr"),
    ({"start_lr": 1.0, "end_lr": 1.0}, "lr_find.start_lr"),
    ({"num_iter": 9}, "lr_find.num_iter"),
    ({"mode": "linear", "step_mult": 1.1}, "lr_find.step_mult"),
])
def test_bad_sweeps_are_refused_with_the_key(section, message):
    with pytest.raises(ConfigError) as err:
        parse_params({"lr_find": section})
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_smoothing_is_bias_corrected():
    # A constant loss must stay exactly constant: without bias correction the EMA would start near 0.
    np.testing.assert_allclose(smooth_losses([2.0] * 20, 0.9), 2.0, rtol=1e-12)
    sm = smooth_losses([1.0, 3.0], 0.5)
    assert sm[1] == pytest.approx((0.5 * 0.5 * 1.0 + 0.5 * 3.0) / (1 - 0.25))


def _grid():
    return 10.0 ** np.round(np.arange(-7.0, 1.0001, 0.1), 10)  # 81 points, log10 step 0.1


def test_steepest_is_the_steepest_descent_in_log_lr():
    lrs = _grid()
    x = np.log10(lrs)
    losses = 2.0 - 1.0 / (1.0 + np.exp(-(x + 2.05) * 3))  # steepest between log10 lr -2.1 and -2.0
    assert suggest_steepest(lrs, losses) == pytest.approx(10 ** -2.1, rel=1e-9)


def test_minimum_is_the_lowest_loss_over_ten():
    lrs = _grid()
    x = np.log10(lrs)
    losses = 1.0 + np.abs(x + 1.0)  # lowest at lr = 0.1
    assert suggest_minimum(lrs, losses) == pytest.approx(0.01, rel=1e-9)


def test_valley_follows_fastai():
    lrs = np.logspace(-7, 1, 100)
    # After trimming (first 10, last 5 points) the window has 85 points: 20 flat, 40 strictly decreasing,
    # 25 rising above the start. The longest decreasing run ends at window index 59 with length 41
    # (one flat point + 40), so it starts at 18; fastai picks 18 + int(41/3) + int(41/3/2) = 18 + 13 + 6 = 37.
    window = np.concatenate([np.full(20, 3.0), np.linspace(2.9, 1.0, 40), np.linspace(3.1, 4.0, 25)])
    losses = np.concatenate([np.full(10, 3.0), window, np.full(5, 4.0)])
    assert suggest_valley(lrs, losses) == pytest.approx(lrs[10 + 37], rel=1e-12)


def _default_like_curve(num_iter: int, noise: float = 0.0, seed: int = 0, spike: float | None = None):
    """A range test's shape, as the default sweep (1e-3 -> 10) measures it: flat at 2.3 to 1e-2, falling faster
    and faster to 1.4 at 0.35, then blowing up. Gaussian noise of ``noise`` on every step, growing to 3 x that at
    the bottom (the real sweeps' losses differ by about 0.05 there between seeds)."""
    lrs = lr_schedule(1e-3, 10.0, num_iter)
    x = np.log10(lrs)
    fall = np.minimum(np.clip((x + 2) / 1.55, 0, None), 1)
    losses = np.where(x <= -0.45, 2.3 - 0.9 * fall ** 2, 1.4 + 3.0 * (x + 0.45))
    losses = losses + np.random.default_rng(seed).normal(0, 1, num_iter) * noise * (1 + 2 * fall)
    if spike is not None:
        losses[-1] = spike
    return lrs, losses


def _spread(values) -> float:
    return max(values) / min(values)


STABLE = 1.1 / 0.9  # max/min of values within +-10% of their centre


def test_robust_moves_continuously_with_the_sweep_length():
    robust = [suggest_robust(*_default_like_curve(n)) for n in (27, 30, 33)]  # 10% fewer or more steps
    assert _spread(robust) < 1.05
    assert 0.1 < robust[1] < 0.35  # below the bottom (0.35), above where the fall starts
    assert robust[1] not in _default_like_curve(30)[0]  # between the sweep's steps, not one of them


def test_robust_stays_within_ten_percent_under_noise_and_sweep_length_where_steepest_does_not():
    curves = [_default_like_curve(n, noise=0.02, seed=seed) for n in (27, 30, 33) for seed in range(5)]
    robust = [suggest_robust(lrs, losses) for lrs, losses in curves]
    steepest = [suggest_steepest(lrs, smooth_losses(losses, 0.9)) for lrs, losses in curves]
    assert _spread(robust) <= STABLE, robust
    assert _spread(steepest) > STABLE  # it jumps between steps 37% apart, and one draw pulls it further


def test_robust_is_not_swamped_by_a_diverged_last_step():
    lrs, losses = _default_like_curve(30, noise=0.03)
    plain = suggest_robust(lrs, losses)
    assert suggest_robust(lrs, _default_like_curve(30, noise=0.03, spike=1e4)[1]) == pytest.approx(plain, rel=0.02)


def test_robust_reads_the_raw_losses_the_others_the_smoothed():
    lrs, losses = _default_like_curve(30, noise=0.03)
    sm = smooth_losses(losses, 0.9)
    result = RangeTestResult(list(lrs), list(losses), list(sm), stopped_early=False, reason="completed")
    result.suggest()
    assert result.suggestions["robust"] == suggest_robust(lrs, losses)
    assert result.suggestions["steepest"] == suggest_steepest(lrs, sm)
    assert parse_params({"lr_find": {"suggestion": "robust"}}).lr_find.suggestion == "robust"


def test_a_curve_that_never_descends_has_no_suggestion(tmp_path):
    assert not descends(np.linspace(2.3, 2.5, 50))
    assert descends(np.linspace(2.3, 1.5, 50))
    report = tmp_path / "lr_find.json"
    report.write_text(json.dumps({"suggested_lr": None}))
    with pytest.raises(NoDescentError, match="never descended"):
        read_suggestion(report)


class _Counter:
    def __init__(self, losses):
        self.losses = iter(losses)

    def __call__(self, images, labels):
        return next(self.losses)


def _batches():
    while True:
        yield torch.zeros(1), torch.zeros(1)


def test_divergence_stops_the_sweep():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = LRFindConfig(num_iter=50, diverge=5.0, smooth=0.0)
    losses = [1.0] * 20 + [6.0] + [1.0] * 29
    result = range_test(model, opt, _batches(), _Counter(losses), cfg, progress=False)
    assert result.stopped_early
    assert len(result.lrs) == 21  # the diverging step is recorded, then the sweep stops
    assert "exceeded" in result.reason
    # the LR set on the optimizer at step i is the sweep's i-th value
    assert result.lrs == pytest.approx(list(lr_schedule(cfg.start_lr, cfg.end_lr, 50)[:21]))


def test_nan_loss_stops_the_sweep():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = LRFindConfig(num_iter=30)
    result = range_test(model, opt, _batches(), _Counter([2.0] * 10 + [math.nan] + [2.0] * 19), cfg, progress=False)
    assert len(result.lrs) == 11 and result.stopped_early
    assert "nan" in result.reason


def test_range_test_restores_weights_optimizer_and_rng_bit_for_bit(workdir):
    from onecycle.training.engine import build_setup

    # 600 - 128 validation = 472 training images: batch 64 does not divide them (last batch 24),
    # and 12 steps run past one epoch, so the data loader is restarted mid-sweep.
    params = load_params(tiny_params(workdir, lr_find={"num_iter": 12}))
    setup = build_setup(params.data, params.augment, params.model, params.train, with_val=False)
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    torch_rng = torch.get_rng_state()
    np_rng = np.random.get_state()[1].copy()
    result = run_range_test(setup, optimizer=params.optimizer, lr_find=params.lr_find, train=params.train,
                            progress=False)
    assert len(result.lrs) == 12
    after = setup.model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert torch.equal(torch_rng, torch.get_rng_state())
    assert np.array_equal(np_rng, np.random.get_state()[1])


@pytest.mark.slow
def test_lr_find_stage_writes_reports_and_an_mlflow_run(workdir):
    import mlflow

    from onecycle.stages.lr_find import main

    tiny_params(workdir, lr_find={"num_iter": 20, "start_lr": 1e-4, "end_lr": 10}, schedule={"max_lr": "auto"})
    assert main(["--params", "params.yaml"]) == 0
    report = json.loads((workdir / "reports/lr_find.json").read_text())
    assert len(report["lrs"]) == 20 == len(report["smoothed"])
    assert set(report["suggestions"]) == {"steepest", "valley", "minimum", "robust"}
    chosen = load_params(workdir / "params.yaml").lr_find.suggestion
    assert report["suggestion"] == chosen and report["suggested_lr"] == report["suggestions"][chosen]
    assert (workdir / "reports/lr_find.png").stat().st_size > 10_000
    rows = (workdir / "reports/lr_find.csv").read_text().splitlines()
    assert rows[0] == "lr,loss,smoothed_loss,suggested_lr,suggestion" and len(rows) == 21
    assert rows[1].split(",")[3:] == [repr(report["suggested_lr"]), report["suggestion"]]
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    run = mlflow.get_run(report["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "lr_find/smoothed_loss")) == 20
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"lr_find.json", "lr_find.png"} <= artifacts


@pytest.mark.slow
def test_a_full_disk_while_logging_the_reports_names_the_artifact_it_was_writing(workdir, monkeypatch, capsys):
    import errno

    import mlflow

    from onecycle.stages.lr_find import main

    def full_disk(*args, **kwargs):  # the artifact copy's own error names neither file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mlflow, "log_artifact", full_disk)
    tiny_params(workdir)
    assert main(["--params", "params.yaml"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("onecycle lr-find: error: no space left on the disk writing ") and \
        err.endswith("/artifacts/lr_find.json (No space left on device); free some space and run again"), err


def test_unfetched_dataset_is_a_clear_error(tmp_path):
    params = tiny_params(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "onecycle", "lr-find", "--params", str(params)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "has not been fetched: run `onecycle fetch`" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "reports").exists()


def test_what_changes_the_sweep_is_a_dvc_param_of_lr_find_and_recorded_in_the_report(tmp_path):
    import yaml

    from onecycle.core.errors import OneCycleError
    from onecycle.training.lr_report import check_measured_on, measured_on

    root = Path(__file__).resolve().parents[3]
    stage_params = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["lr_find"]["params"]
    # the range test clips gradients as train does (run_range_test), and train.seed sets the initial weights and
    # the sweep's data order (bench/lr_spread.py: seed 1 moved steepest from 0.22 to 0.30)
    assert {"train.grad_clip", "train.seed"} <= set(stage_params)
    report = tmp_path / "lr_find.json"
    report.write_text(json.dumps({"suggested_lr": 0.2, "measured_on": measured_on(parse_params({}).flat(), "d")}))
    clipped = parse_params({"train": {"grad_clip": 1.0}}).flat()
    with pytest.raises(OneCycleError, match="measured with train.grad_clip = null, but the params say 1.0"):
        check_measured_on(report, measured_on(clipped, "d"))
