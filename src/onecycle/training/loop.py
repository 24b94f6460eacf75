"""The One Cycle epoch loop that train and tune share: a plain function with no MLflow, no paths, no cwd.

``train_one_epoch`` runs the optimizer steps of one epoch and steps the LR schedule, once per optimizer
step, there and nowhere else; ``fit`` is the epoch loop: train, validate, keep the best weights, and hand
each epoch to the caller's :class:`FitHooks` (checkpoint writing, logging, pruning). Stopping on request
(SIGINT/SIGTERM) happens between two optimizer steps, with the state so far handed to ``save_last``.

``step_fn`` (one optimizer step) is a parameter of ``fit``: the seam through which tests inject faults.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from onecycle.config import OptimizerConfig, ScheduleConfig, TrainConfig
from onecycle.core.errors import OneCycleError
from onecycle.data.loaders import set_epoch, skip_batches
from onecycle.training import checkpoint as ckpt
from onecycle.training import distributed as dist
from onecycle.training.averaging import WeightAverage, build_average
from onecycle.training.engine import (
    DivergenceError,
    Setup,
    build_optimizer,
    evaluate,
    make_scaler,
    to_device,
    train_step,
)
from onecycle.training.records import EpochResult, Step, epoch_row
from onecycle.training.schedule import build_scheduler, current_momentum

log = logging.getLogger(__name__)

# Keys that do not change what training computes (so a resumed run may differ in them).
NEUTRAL_KEYS = {"data.num_workers", "train.resume", "train.checkpoint_every", "train.threads", "train.compile",
                "mlflow.experiment", "mlflow.registered_model", "mlflow.log_checkpoints", "mlflow.system_metrics",
                "train.check_every"}


def config_hash(flat_params: dict, max_lr: float) -> str:
    """Hash of everything that changes the result of training (and the LR actually used), from the dotted
    params (``Params.flat()``): the identity of a configuration, so it reads every section."""
    flat = {k: v for k, v in flat_params.items()
            if k.split(".")[0] in ("data", "augment", "model", "optimizer", "schedule", "train") and k not in NEUTRAL_KEYS}
    flat["schedule.max_lr"] = float(max_lr)
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Interrupted(OneCycleError):
    """Training stopped on request (SIGINT/SIGTERM) after checkpointing; exit code 130."""

    exit_code = 130


class StepGuard:
    """NaN/inf and stop checks without a device-to-host sync or a collective on every optimizer step.

    Each step records on the device whether its loss was finite (and the first step whose loss was not);
    every ``check_every`` steps, and at the end of every epoch, one host read and one all-reduce (under DDP)
    decide for all ranks together: a non-finite loss on any rank raises :class:`DivergenceError` naming the
    first bad step, a stop requested on any rank stops all. Checkpoints are written only after a check, so
    a bad step is never checkpointed.
    """

    def __init__(self, device: torch.device, check_every: int, should_stop: Callable[[], bool] | None):
        self.check_every, self.should_stop = max(1, int(check_every)), should_stop
        self.bad_step = torch.tensor(-1, device=device)  # first global step with a non-finite loss
        self.bad_loss = torch.tensor(0.0, device=device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        first = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_loss = torch.where(first, loss, self.bad_loss)

    def due(self, steps_done: int) -> bool:
        return steps_done % self.check_every == 0

    def check(self, epoch: int) -> bool:
        """Raise on divergence (any rank); return whether a stop was requested (any rank)."""
        bad_step = int(self.bad_step)  # the one sync
        stop = bool(self.should_stop()) if self.should_stop is not None else False
        bad_any, stop_any = dist.any_each(bad_step >= 0, stop)
        if bad_any:
            value = float(self.bad_loss) if bad_step >= 0 else "NaN/inf on another rank"
            where = f"epoch {epoch + 1}, step {bad_step + 1}" if bad_step >= 0 else f"epoch {epoch + 1}"
            raise DivergenceError(f"the training loss became {value} at {where}; lower schedule.max_lr "
                                  "(or div_factor), or enable train.grad_clip")
        return stop_any


class EpochInterrupted(Exception):
    """A stop was requested between two optimizer steps; ``partial`` holds the epoch so far."""

    def __init__(self, partial: dict):
        super().__init__("epoch interrupted")
        self.partial = partial


def train_one_epoch(model, loader, optimizer, scheduler, scaler, loss_fn, device, dtype, *, epoch: int,
                    global_step: int, channels_last: bool = False, grad_clip: float | None = None,
                    progress: bool = True, partial: dict | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    step_fn: Callable = train_step, check_every: int = 1,
                    average: WeightAverage | None = None) -> tuple[dict, list[Step]]:
    """One pass over ``loader``; returns epoch metrics and the :class:`Step` (index, lr, momentum) of each step.

    The scheduler is stepped here, once per optimizer step, and nowhere else. ``partial`` continues an
    epoch that was interrupted (its first batches are skipped, its sums carried on). Every ``check_every``
    steps and at the end (:class:`StepGuard`), a non-finite loss raises :class:`DivergenceError` and a
    ``should_stop()`` request raises :class:`EpochInterrupted` with the state so far. ``average`` (a
    :class:`WeightAverage`) is updated after every optimizer step.
    """
    from tqdm.auto import tqdm

    model.train()
    set_epoch(loader, epoch)
    partial = partial or {"step_in_epoch": 0, "loss_sum": 0.0, "correct": 0, "n": 0, "steps": [], "seconds": 0.0}
    if partial["step_in_epoch"]:
        skip_batches(loader, partial["step_in_epoch"])
    loss_sum = torch.tensor(float(partial["loss_sum"]), device=device)
    correct = torch.tensor(int(partial["correct"]), device=device, dtype=torch.long)
    n = int(partial["n"])
    steps = [Step(*s) for s in partial["steps"]]
    t0 = time.perf_counter() - float(partial["seconds"])
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=None if progress else True,
               initial=partial["step_in_epoch"], total=partial["step_in_epoch"] + len(loader))
    guard = StepGuard(device, check_every, should_stop)

    def interrupted() -> EpochInterrupted:
        return EpochInterrupted({"step_in_epoch": len(steps), "loss_sum": loss_sum.item(),
                                 "correct": int(correct.item()), "n": n, "steps": [tuple(s) for s in steps],
                                 "seconds": time.perf_counter() - t0})

    try:
        for images, labels in bar:
            images, labels = to_device(images, labels, device, channels_last)
            lr, momentum = optimizer.param_groups[0]["lr"], current_momentum(optimizer)
            loss, logits = step_fn(model, images, labels, optimizer, scaler, loss_fn, device, dtype, grad_clip)
            guard.record(loss, global_step)
            scheduler.step()
            steps.append(Step(global_step, lr, momentum))
            global_step += 1
            if average is not None:
                average.update(global_step)
            bs = labels.shape[0]
            loss_sum += loss.float() * bs
            correct += (logits.argmax(1) == labels).sum()
            n += bs
            if guard.due(len(steps)):
                if bar.disable is False:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
                if guard.check(epoch):
                    raise interrupted()
        guard.check(epoch)  # divergence in the last steps; a stop now is the epoch loop's (after validation)
    finally:
        bar.close()
        skip_batches(loader, 0)
    total_loss, total_correct, total_n = dist.sum_(loss_sum.item(), correct.item(), n)  # all ranks' images
    return ({"loss": total_loss / max(total_n, 1), "top1": total_correct / max(total_n, 1), "images": int(total_n),
             "seconds": time.perf_counter() - t0}, steps)


class StopSignals:
    """While active (a ``with`` block), SIGINT and SIGTERM only request a stop, which the work honours at its next
    safe point, where stopping cuts nothing in half: ``fit`` between two optimizer steps (the object is its
    ``should_stop``), so the checkpoint written then is consistent; other code at :meth:`check`. Ctrl-C again (a
    SIGINT after the first signal) raises KeyboardInterrupt at once; a SIGTERM after it is the same request again
    (a DDP worker gets a job's SIGTERM both from the scheduler and through torchrun). Leaving the block restores
    the previous handlers. Signals reach the main thread only: in another thread nothing is installed. ``then``
    says, in the warning a first signal logs, what happens next."""

    def __init__(self, then: str = "stopping after this step and writing a checkpoint"):
        self.received: int | None = None
        self.then = then
        self._old: dict = {}

    def __call__(self) -> bool:
        return self.received is not None

    def check(self) -> None:
        """A safe point: raise KeyboardInterrupt if a stop was requested."""
        if self.received is not None:
            raise KeyboardInterrupt

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is not None:
            return
        self.received = signum
        log.warning("%s received: %s (Ctrl-C again to abort)", signal.Signals(signum).name, self.then)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@dataclass
class FitHooks:
    """What the caller does with each epoch; every hook is optional.

    ``save_last(state)`` / ``save_best(state)`` receive checkpoint dicts to persist; ``on_epoch(epoch, row,
    steps, history)`` runs after each epoch (logging, history, pruning: it may raise to stop).
    """

    save_last: Callable[[dict], None] | None = None
    save_best: Callable[[dict], None] | None = None
    on_epoch: Callable[[int, dict, list, list], None] | None = None


@dataclass
class FitResult:
    """What :func:`fit` returns: the per-epoch history, the best epoch and its weights, steps and seconds."""
    history: list[dict] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None
    global_step: int = 0
    seconds: float = 0.0


def fit(setup: Setup, max_lr: float, *, train: TrainConfig, schedule: ScheduleConfig, optimizer: OptimizerConfig,
        hooks: FitHooks | None = None, resume_state: dict | None = None, progress: bool = True,
        should_stop: Callable[[], bool] | None = None, step_fn: Callable = train_step) -> FitResult:
    """Train ``setup.model`` for ``train.epochs`` with One Cycle to ``max_lr``; the epoch loop.

    Per epoch: train, validate, hand checkpoint states to ``hooks.save_best``/``save_last``, print one
    line, call ``hooks.on_epoch``. ``resume_state`` (a ``save_last`` state, optionally with the best
    weights under ``best_model``) continues a run at its exact step. When ``should_stop()`` turns true, the
    current state (mid-epoch included) goes to ``save_last`` and :class:`Interrupted` is raised.
    """
    hooks = hooks or FitHooks()
    tcfg = train
    model, net, device, dtype = setup.model, setup.net, setup.device, setup.dtype
    optimizer = build_optimizer(optimizer, net, lr=max_lr / schedule.div_factor)  # the section in, torch's out
    steps_per_epoch = len(setup.train_loader)
    scheduler = build_scheduler(optimizer, schedule, max_lr, tcfg.epochs, steps_per_epoch)
    scaler = make_scaler(device, dtype)
    average = build_average(tcfg, net, tcfg.epochs * steps_per_epoch)
    result = FitResult()
    start_epoch, partial = 0, None
    if resume_state is not None:
        net.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        if average is not None:
            average.load_state_dict(resume_state["average"])
        ckpt.set_rng_state(resume_state["rng"])
        start_epoch = int(resume_state["epoch"])
        partial = resume_state.get("partial")
        result.global_step = int(resume_state["global_step"])
        result.history = list(resume_state["history"])
        result.best_top1 = float(resume_state["best_top1"])
        result.best_epoch = int(resume_state["best_epoch"])
        result.seconds = float(resume_state.get("seconds", 0.0))
        result.best_state = resume_state.get("best_model")
    step_model = torch.compile(model) if tcfg.compile else model

    def last_state(epoch_done: int, partial_state: dict | None = None) -> dict:
        return {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch_done, "partial": partial_state,
                "global_step": result.global_step, "rng": ckpt.rng_state(), "history": result.history,
                "best_top1": result.best_top1, "best_epoch": result.best_epoch, "seconds": result.seconds,
                "max_lr": float(max_lr), "finished": epoch_done == tcfg.epochs,
                "average": average.state_dict() if average is not None else None}

    for epoch in range(start_epoch, tcfg.epochs):
        try:
            train_m, steps = train_one_epoch(step_model, setup.train_loader, optimizer, scheduler, scaler,
                                             setup.loss_fn, device, dtype, epoch=epoch, global_step=result.global_step,
                                             channels_last=tcfg.channels_last, grad_clip=tcfg.grad_clip,
                                             progress=progress, partial=partial if epoch == start_epoch else None,
                                             should_stop=should_stop, step_fn=step_fn,
                                             check_every=tcfg.check_every, average=average)
        except EpochInterrupted as stop:
            result.global_step = stop.partial["steps"][-1][0] + 1
            if hooks.save_last is not None:
                hooks.save_last(last_state(epoch, stop.partial))
            raise Interrupted(f"stopped at epoch {epoch + 1}, step {stop.partial['step_in_epoch']} of "
                              f"{steps_per_epoch}") from None
        result.global_step = steps[-1].step + 1
        if average is not None and epoch + 1 == tcfg.epochs:
            average.finish()  # the last step has run: validate, keep and save the averaged network
        t_val = time.perf_counter()
        val_m = evaluate(model, setup.val_loader, device, dtype, tcfg.channels_last) if setup.val_loader else {}
        secs = train_m["seconds"] + time.perf_counter() - t_val
        result.seconds += secs
        row = epoch_row(EpochResult(epoch, train_m, val_m, steps, secs))
        result.history.append(row)
        score = row["val_top1"] if row["val_top1"] is not None else -row["train_loss"]
        if score > result.best_top1:
            result.best_top1, result.best_epoch = score, epoch + 1
            result.best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            if hooks.save_best is not None:
                hooks.save_best({"model": result.best_state, "epoch": epoch + 1, "val_top1": row["val_top1"]})
        stopping = should_stop is not None and dist.any_(should_stop())
        if hooks.save_last is not None and ((epoch + 1) % tcfg.checkpoint_every == 0 or epoch + 1 == tcfg.epochs
                                            or stopping):
            hooks.save_last(last_state(epoch + 1))
        val_txt = (f"val loss {row['val_loss']:.4f} top1 {row['val_top1']:.4f} top5 {row['val_top5']:.4f}"
                   if row["val_top1"] is not None else "no validation split")
        if dist.is_main():
            print(f"epoch {epoch + 1}/{tcfg.epochs}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.4f}, "
                  f"{val_txt}, lr {row['lr']:.2e}, {secs:.1f}s ({row['images_per_second']:.0f} img/s)", flush=True)
        if hooks.on_epoch is not None:
            hooks.on_epoch(epoch, row, steps, result.history)
        if stopping and epoch + 1 < tcfg.epochs:
            raise Interrupted(f"stopped after epoch {epoch + 1}")
    return result
