"""The LR range test's suggestions (``lr_find.suggestion``): each a function of the sweep's LRs and losses that
gives the LR to peak at, registered in :data:`SUGGESTERS`, whose names are the values the config accepts.

``steepest``, ``valley`` and ``minimum`` read the bias-corrected EMA of the losses (fastai's); ``robust`` reads the
raw losses and smooths them both ways itself. Adding a suggester is one function here, decorated with
``@suggester("name")``, and its test; the lr_find plot marks every one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onecycle.core.registry import Registry

# fastai trims the first tenth and the last 5 points of the curve before suggesting (noisy ends).
SKIP_END = 5


@dataclass(frozen=True)
class Suggester:
    """A registered suggestion: ``suggest(lrs, losses) -> lr``, and whether it reads the raw (not smoothed) losses."""

    suggest: Callable[[np.ndarray, np.ndarray], float]
    reads_raw: bool = False


SUGGESTERS: Registry[Suggester] = Registry("lr_find.suggestion")


def suggester(name: str, reads_raw: bool = False) -> Callable:
    """Decorator: register the decorated ``suggest(lrs, losses)`` as ``lr_find.suggestion: name``."""
    def add(fn: Callable[[np.ndarray, np.ndarray], float]) -> Callable[[np.ndarray, np.ndarray], float]:
        SUGGESTERS.register(name)(Suggester(fn, reads_raw))
        return fn

    return add


def _window(lrs: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop the noisy ends (first tenth, last 5 points) when the curve is long enough."""
    n = len(losses)
    start = n // 10
    end = n - SKIP_END if n - SKIP_END - start >= 3 else n
    return lrs[start:end], losses[start:end], start


@suggester("steepest")
def suggest_steepest(lrs: np.ndarray, losses: np.ndarray) -> float:
    """LR at the most negative slope of loss against log LR (forward differences, as fastai's ``steep``)."""
    lr_w, loss_w, _ = _window(lrs, losses)
    grads = np.diff(loss_w) / np.diff(np.log(lr_w))
    return float(lr_w[int(np.argmin(grads))])


@suggester("valley")
def suggest_valley(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai's ``valley``: the longest steadily decreasing stretch, a little past its middle."""
    lr_w, loss_w, _ = _window(lrs, losses)
    n = len(loss_w)
    lds = [1] * n  # length of the longest decreasing subsequence ending at each point
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if loss_w[i] < loss_w[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lr_w[min(idx, n - 1)])


@suggester("minimum")
def suggest_minimum(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The LR of the lowest loss, divided by 10 (fastai's ``minimum``)."""
    lr_w, loss_w, _ = _window(lrs, losses)
    return float(lr_w[int(np.argmin(loss_w))] / 10)


ROBUST_BANDWIDTH = 0.2  # decades of LR: the Gaussian kernel's standard deviation in suggest_robust
ROBUST_CLIP = 2.0  # losses above this x the starting loss count as this (a diverged step's 1e3 would swamp the fit)


def kernel_smooth(lrs: np.ndarray, losses: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """Local-linear Gaussian kernel regression of ``losses`` against log10(lr), evaluated at log10-LR ``grid``.

    Unlike the EMA it looks both ways (no lag to the right) and is defined between the sweep's steps; local-linear
    rather than a plain weighted mean, so the ends of the sweep are not pulled flat.
    """
    x = np.log10(lrs)
    d = x[None, :] - grid[:, None]
    w = np.exp(-0.5 * (d / bandwidth) ** 2)
    s0, s1, s2 = w.sum(1), (w * d).sum(1), (w * d * d).sum(1)
    t0, t1 = (w * losses).sum(1), (w * losses * d).sum(1)
    det = s0 * s2 - s1 * s1
    return np.where(det > 1e-12 * s0 * s0, (s2 * t0 - s1 * t1) / np.where(det > 0, det, 1), t0 / s0)


@suggester("robust", reads_raw=True)
def suggest_robust(lrs: np.ndarray, raw_losses: np.ndarray, bandwidth: float = ROBUST_BANDWIDTH) -> float:
    """Halfway in log LR between the steepest descent and the bottom of the raw loss, smoothed both ways.

    The raw losses (clipped at ``ROBUST_CLIP`` x the starting loss) are smoothed by :func:`kernel_smooth` with a
    ``bandwidth``-decade kernel on a fine grid, so the answer moves continuously with the data instead of jumping
    between the sweep's steps (37% apart in the default sweep), and the EMA's lag does not push the steepest
    point towards the minimum. Either point alone still moves with the noise (the steepest descent of a curve
    that falls faster and faster up to its bottom sits next to that bottom); their geometric middle moved least
    under other seeds, 10% more or fewer steps and bf16 (bench/lr_spread.py, docs: explanation/lr-range-test).
    """
    lrs, y = np.asarray(lrs, dtype=np.float64), np.asarray(raw_losses, dtype=np.float64)
    start = float(np.median(y[:max(3, len(y) // 10)]))
    y = np.minimum(y, ROBUST_CLIP * start) if start > 0 else y
    grid = np.linspace(np.log10(lrs[0]), np.log10(lrs[-1]), 1000)
    smooth = kernel_smooth(lrs, y, grid, bandwidth)
    bottom = int(np.argmin(smooth))
    steepest = int(np.argmin(np.gradient(smooth[:bottom + 1], grid[:bottom + 1]))) if bottom >= 2 else bottom
    return float(10 ** ((grid[bottom] + grid[steepest]) / 2))
