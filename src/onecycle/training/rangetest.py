"""The LR range test (Leslie Smith), as torch-lr-finder's ``range_test`` and fastai's ``lr_find``: the sweep and
the suggestions, run by the lr_find stage.

The learning rate grows from ``lr_find.start_lr`` to ``end_lr`` over ``num_iter`` mini-batches of the
training split, with the model, optimizer, augmentations, batch size and precision that ``train`` uses.
The loss is smoothed by a bias-corrected exponential moving average; the sweep stops early when the
smoothed loss exceeds ``diverge`` x its best, or is not finite. Every registered suggestion is computed
(:mod:`onecycle.training.suggest`); ``lr_find.suggestion`` picks the one ``train`` uses when
``schedule.max_lr`` is ``auto`` (read back by :mod:`onecycle.training.lr_report`). Model, optimizer and RNG
states are restored bit-for-bit afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from onecycle.config import LRFindConfig, OptimizerConfig, TrainConfig
from onecycle.training.suggest import SUGGESTERS

# A sweep over more passes of the training split than this measures the loss on batches it has already trained on.
MAX_SWEEP_EPOCHS = 4
MIN_SWEEP_STEPS = 10  # lr_find.num_iter's least


def fitted_num_iter(num_iter: int, steps_per_epoch: int) -> int:
    """``lr_find.num_iter``, capped to what the training split gives: :data:`MAX_SWEEP_EPOCHS` passes over its
    ``steps_per_epoch`` batches, and never below :data:`MIN_SWEEP_STEPS`."""
    return min(num_iter, max(MIN_SWEEP_STEPS, MAX_SWEEP_EPOCHS * steps_per_epoch))


def lr_schedule(start_lr: float, end_lr: float, num_iter: int, mode: str = "exp") -> np.ndarray:
    """The LR of each of ``num_iter`` steps: lr[0] = start_lr, lr[-1] = end_lr, geometric or evenly spaced."""
    i = np.arange(num_iter, dtype=np.float64) / (num_iter - 1)
    if mode == "exp":
        return start_lr * (end_lr / start_lr) ** i
    return start_lr + (end_lr - start_lr) * i


class LossSmoother:
    """Bias-corrected exponential moving average: avg_i = beta avg_{i-1} + (1-beta) loss_i, / (1 - beta^(i+1))."""

    def __init__(self, beta: float):
        self.beta, self.avg, self.n = beta, 0.0, 0

    def __call__(self, loss: float) -> float:
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        return self.avg / (1 - self.beta ** self.n) if self.beta > 0 else loss


def smooth_losses(losses, beta: float) -> np.ndarray:
    """The whole smoothed curve, as the range test computes it step by step."""
    smoother = LossSmoother(beta)
    return np.asarray([smoother(loss) for loss in losses], dtype=np.float64)


def descends(smoothed: np.ndarray, tolerance: float = 0.01) -> bool:
    """Whether the smoothed loss ever fell at least ``tolerance`` (relative) below where it started."""
    finite = smoothed[np.isfinite(smoothed)]
    return len(finite) >= 2 and float(finite.min()) < float(finite[0]) * (1 - tolerance)


@dataclass
class RangeTestResult:
    """A range test's sweep: LRs, raw and smoothed losses, why it stopped, and every suggestion."""
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped_early: bool
    reason: str
    suggestions: dict[str, float | None] = field(default_factory=dict)
    descended: bool = True

    def suggest(self) -> None:
        lrs = np.asarray(self.lrs)
        sm = np.asarray(self.smoothed)
        self.descended = descends(sm)
        ok = np.isfinite(sm)
        lrs, sm, raw = lrs[ok], sm[ok], np.asarray(self.losses, dtype=np.float64)[ok]
        self.suggestions = {name: (s.suggest(lrs, raw if s.reads_raw else sm) if self.descended and len(sm) >= 3
                                   else None) for name, s in SUGGESTERS.items()}


def range_test(model, optimizer, batches, step, lr_cfg, progress: bool = True) -> RangeTestResult:
    """Sweep the LR over ``lr_cfg.num_iter`` calls of ``step(images, labels) -> loss``; restore nothing itself.

    ``batches`` is an iterator that is restarted (by the caller's factory) when the data run out.
    The LR of step i is set before the step, in one place: ``lr_schedule(...)[i]``.
    """
    from tqdm.auto import tqdm

    lrs = lr_schedule(lr_cfg.start_lr, lr_cfg.resolved_end_lr, lr_cfg.num_iter, lr_cfg.mode)
    raw, smoothed, used = [], [], []
    best = math.inf
    smoother = LossSmoother(lr_cfg.smooth)
    reason = "completed"
    bar = tqdm(total=lr_cfg.num_iter, desc="lr_find", unit="step", disable=None if progress else True, leave=False)
    every = max(1, lr_cfg.num_iter // 5) if progress and bar.disable else 0  # no terminal: a line a fifth of the way
    for lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
        images, labels = next(batches)
        loss = float(step(images, labels))
        used.append(float(lr))
        raw.append(loss)
        if not math.isfinite(loss):
            smoothed.append(float("nan"))
            reason = f"loss became {loss} at lr {lr:.3g}"
            break
        sm = smoother(loss)
        smoothed.append(sm)
        best = min(best, sm)
        bar.update(1)
        bar.set_postfix(lr=f"{lr:.2e}", loss=f"{sm:.3f}")
        if every and len(used) % every == 0 and len(used) < lr_cfg.num_iter:
            print(f"lr_find: step {len(used)} of {lr_cfg.num_iter}: lr {lr:.2e}, smoothed loss {sm:.3f}", flush=True)
        if sm > lr_cfg.diverge * best:
            reason = f"smoothed loss {sm:.3g} exceeded {lr_cfg.diverge:g} x best {best:.3g} at lr {lr:.3g}"
            break
    bar.close()
    result = RangeTestResult(used, raw, smoothed, stopped_early=len(used) < lr_cfg.num_iter, reason=reason)
    result.suggest()
    return result


def cycle(loader):
    """Batches forever: restart the loader (next epoch's order) when it runs out."""
    from onecycle.data.loaders import set_epoch

    epoch = 0
    while True:
        set_epoch(loader, epoch)
        yield from loader
        epoch += 1


def run_range_test(setup, *, optimizer: OptimizerConfig, lr_find: LRFindConfig, train: TrainConfig,
                   progress: bool = True) -> RangeTestResult:
    """The LR range test exactly as ``train`` would train: same model, optimizer, data, precision (``setup`` from
    :func:`onecycle.training.engine.build_setup`, without a validation split)."""
    from onecycle.training.engine import build_optimizer, make_scaler, preserved_state, to_device, train_step

    cfg = lr_find
    model = setup.model
    model.train()
    optimizer = build_optimizer(optimizer, model, lr=cfg.start_lr)  # the section in, torch's out
    scaler = make_scaler(setup.device, setup.dtype)
    channels_last = train.channels_last

    def step(images, labels):
        images, labels = to_device(images, labels, setup.device, channels_last)
        loss, _ = train_step(model, images, labels, optimizer, scaler, setup.loss_fn, setup.device, setup.dtype,
                             train.grad_clip)
        return loss.item()

    with preserved_state(model, optimizer):
        return range_test(model, optimizer, cycle(setup.train_loader), step, cfg, progress=progress)
