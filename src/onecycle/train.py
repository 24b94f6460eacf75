"""train stage: a plain PyTorch One Cycle trainer, tracked in MLflow, checkpointed, resumable.

``train_one_epoch`` and ``evaluate`` (in engine) are small; only the epoch loop in :func:`fit` logs,
checkpoints and decides. The LR schedule advances once per optimizer step, in ``train_one_epoch``.

Resume: when ``checkpoints/last.pt`` holds the same configuration (a hash of every key that changes
the result), training continues from it in the same MLflow run with the schedule at the exact step.
A checkpoint of a *different* configuration is never used: training starts fresh with a warning and
the old checkpoints are moved to ``checkpoints/previous/``. ``train.resume: false`` always starts fresh.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed as dist
from .cli import run_command
from .data import atomic_write_text
from .engine import (
    DivergenceError,
    Setup,
    build_optimizer,
    build_setup,
    check_finite,
    device_name,
    evaluate,
    make_scaler,
    to_device,
    train_step,
)
from .errors import OneCycleError
from .loaders import set_epoch, skip_batches
from .schedule import build_scheduler, current_momentum

log = logging.getLogger(__name__)

MODEL_PATH = Path("models/model.pt")
TRAIN_JSON = Path("reports/train.json")
HISTORY_CSV = Path("reports/history.csv")
CHECKPOINT_DIR = Path("checkpoints")
HISTORY_COLUMNS = ["epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "momentum",
                   "epoch_seconds", "images_per_second"]
# history.csv column -> MLflow metric key
METRIC_KEYS = {"train_loss": "train/loss", "train_top1": "train/top1", "val_loss": "val/loss", "val_top1": "val/top1",
               "val_top5": "val/top5", "lr": "epoch/lr", "momentum": "epoch/momentum",
               "epoch_seconds": "epoch/seconds", "images_per_second": "epoch/images_per_second"}
# Keys that do not change what training computes (so a resumed run may differ in them).
_NEUTRAL = {"data.num_workers", "train.resume", "train.checkpoint_every", "train.threads", "train.compile",
            "mlflow.experiment", "mlflow.registered_model", "mlflow.log_checkpoints"}


def config_hash(params, max_lr: float) -> str:
    """Hash of everything that changes the result of training (and the LR actually used)."""
    import hashlib

    flat = {k: v for k, v in params.flat().items()
            if k.split(".")[0] in ("data", "augment", "model", "optimizer", "schedule", "train") and k not in _NEUTRAL}
    flat["schedule.max_lr"] = float(max_lr)
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Interrupted(OneCycleError):
    """Training stopped on request (SIGINT/SIGTERM) after checkpointing; exit code 130."""

    exit_code = 130


class EpochInterrupted(Exception):
    """A stop was requested between two optimizer steps; ``partial`` holds the epoch so far."""

    def __init__(self, partial: dict):
        super().__init__("epoch interrupted")
        self.partial = partial


def train_one_epoch(model, loader, optimizer, scheduler, scaler, loss_fn, device, dtype, *, epoch: int,
                    global_step: int, channels_last: bool = False, grad_clip: float | None = None,
                    progress: bool = True, partial: dict | None = None,
                    should_stop: Callable[[], bool] | None = None) -> tuple[dict, list[tuple[int, float, float]]]:
    """One pass over ``loader``; returns epoch metrics and the (step, lr, momentum) each step used.

    The scheduler is stepped here, once per optimizer step, and nowhere else. ``partial`` continues an
    epoch that was interrupted (its first batches are skipped, its sums carried on); ``should_stop`` is
    checked after every step and raises :class:`EpochInterrupted` with the state so far.
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
    steps = [tuple(s) for s in partial["steps"]]
    t0 = time.perf_counter() - float(partial["seconds"])
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=None if progress else True,
               initial=partial["step_in_epoch"], total=partial["step_in_epoch"] + len(loader))
    try:
        for images, labels in bar:
            images, labels = to_device(images, labels, device, channels_last)
            lr, momentum = optimizer.param_groups[0]["lr"], current_momentum(optimizer)
            loss, logits = train_step(model, images, labels, optimizer, scaler, loss_fn, device, dtype, grad_clip)
            check_finite(loss, f"epoch {epoch + 1}, step {global_step + 1}")
            scheduler.step()
            steps.append((global_step, lr, momentum))
            global_step += 1
            bs = labels.shape[0]
            loss_sum += loss.float() * bs
            correct += (logits.argmax(1) == labels).sum()
            n += bs
            if bar.disable is False:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            if should_stop is not None and dist.any_(should_stop()):
                raise EpochInterrupted({"step_in_epoch": len(steps), "loss_sum": loss_sum.item(),
                                        "correct": int(correct.item()), "n": n, "steps": steps,
                                        "seconds": time.perf_counter() - t0})
    finally:
        bar.close()
        skip_batches(loader, 0)
    total_loss, total_correct, total_n = dist.sum_(loss_sum.item(), correct.item(), n)  # all ranks' images
    return ({"loss": total_loss / max(total_n, 1), "top1": total_correct / max(total_n, 1), "images": int(total_n),
             "seconds": time.perf_counter() - t0}, steps)


class StopSignals:
    """While active, SIGINT and SIGTERM only request a stop, honoured between two optimizer steps so that
    the checkpoint written then is consistent. A second SIGINT interrupts at once."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __call__(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: stopping after this step and writing a checkpoint (Ctrl-C again to abort)",
                    signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class RunLogger:
    """Logs to one MLflow run; if the store is locked or unreachable, keeps the metrics and retries later."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self.pending: list = []
        self.warned = False

    def existing_steps(self, key: str) -> set[int]:
        if self.run_id is None:
            return set()
        import mlflow

        try:
            return {m.step for m in mlflow.MlflowClient().get_metric_history(self.run_id, key)}
        except Exception:  # a store we cannot read now: assume nothing was logged (duplicates beat gaps)
            return set()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()
                         if v is not None and math.isfinite(float(v))]

    def flush(self) -> bool:
        if self.run_id is None:  # no run to log to (a DDP rank other than 0, a bare fit): nothing to keep
            self.pending.clear()
            return True
        if not self.pending:
            return True
        import mlflow

        client = mlflow.MlflowClient()
        try:
            while self.pending:
                chunk = self.pending[:1000]
                client.log_batch(self.run_id, metrics=chunk)
                del self.pending[:len(chunk)]
        except Exception as exc:
            log.warning("MLflow is not reachable (%s); %d metric values kept and retried after the next epoch",
                        " ".join(str(exc).split())[:160], len(self.pending))
            self.warned = True
            return False
        if self.warned:
            log.warning("MLflow is reachable again; the kept metrics were logged")
            self.warned = False
        return True


def _row_metrics(row: dict) -> dict[str, float]:
    return {METRIC_KEYS[k]: row[k] for k in METRIC_KEYS if row.get(k) is not None}


def write_history(rows: list[dict], path: Path = HISTORY_CSV) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_COLUMNS})
    atomic_write_text(path, buf.getvalue())


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None
    global_step: int = 0
    seconds: float = 0.0


def fit(params, setup: Setup, max_lr: float, *, logger: RunLogger | None = None, checkpoint_dir: Path | None = None,
        resume_state: dict | None = None, run_id: str | None = None, config_id: str = "",
        on_epoch: Callable[[int, dict], None] | None = None, progress: bool = True,
        history_path: Path | None = None, should_stop: Callable[[], bool] | None = None) -> FitResult:
    """Train ``setup.model`` for ``train.epochs`` with One Cycle to ``max_lr``; the epoch loop.

    Per epoch: train, validate, checkpoint (``checkpoint_dir``), then log (``logger``, ``history_path``)
    and call ``on_epoch(epoch, row)`` (tune's pruning hook). Returns the history and the best weights.
    When ``should_stop()`` turns true, the current state (mid-epoch included) is checkpointed and
    :class:`Interrupted` is raised.
    """
    tcfg = params.train
    model, net, device, dtype = setup.model, setup.net, setup.device, setup.dtype
    optimizer = build_optimizer(params.optimizer, net, lr=max_lr / params.schedule.div_factor)
    steps_per_epoch = len(setup.train_loader)
    scheduler = build_scheduler(optimizer, params.schedule, max_lr, tcfg.epochs, steps_per_epoch)
    scaler = make_scaler(device, dtype)
    result = FitResult()
    start_epoch, partial = 0, None
    if resume_state is not None:
        net.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        ckpt.set_rng_state(resume_state["rng"])
        start_epoch = int(resume_state["epoch"])
        partial = resume_state.get("partial")
        result.global_step = int(resume_state["global_step"])
        result.history = list(resume_state["history"])
        result.best_top1 = float(resume_state["best_top1"])
        result.best_epoch = int(resume_state["best_epoch"])
        result.seconds = float(resume_state.get("seconds", 0.0))
        best_path = checkpoint_dir / "best.pt" if checkpoint_dir else None
        if best_path is not None and best_path.is_file():
            result.best_state = ckpt.load(best_path)["model"]
    step_model = torch.compile(model) if tcfg.compile else model
    logged_epochs = logger.existing_steps("val/top1" if setup.val_loader else "train/loss") if logger else set()
    logged_steps = logger.existing_steps("lr") if (logger and resume_state) else set()

    def save_last(epoch_done: int, partial_state: dict | None = None) -> None:
        ckpt.save({
            "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch_done, "partial": partial_state,
            "global_step": result.global_step, "rng": ckpt.rng_state(), "history": result.history,
            "best_top1": result.best_top1, "best_epoch": result.best_epoch, "seconds": result.seconds,
            "config_hash": config_id, "mlflow_run_id": run_id, "max_lr": float(max_lr),
            "finished": epoch_done == tcfg.epochs,
        }, checkpoint_dir / "last.pt")

    for epoch in range(start_epoch, tcfg.epochs):
        try:
            train_m, steps = train_one_epoch(step_model, setup.train_loader, optimizer, scheduler, scaler,
                                             setup.loss_fn, device, dtype, epoch=epoch, global_step=result.global_step,
                                             channels_last=tcfg.channels_last, grad_clip=tcfg.grad_clip,
                                             progress=progress, partial=partial if epoch == start_epoch else None,
                                             should_stop=should_stop)
        except EpochInterrupted as stop:
            result.global_step = stop.partial["steps"][-1][0] + 1
            where = f"epoch {epoch + 1}, step {stop.partial['step_in_epoch']} of {steps_per_epoch}"
            if checkpoint_dir is not None:
                save_last(epoch, stop.partial)
                raise Interrupted(f"stopped at {where}; the state is in {checkpoint_dir / 'last.pt'}: run "
                                  "`onecycle train` (or `dvc repro`) again to resume") from None
            raise Interrupted(f"stopped at {where}") from None
        result.global_step = steps[-1][0] + 1
        t_val = time.perf_counter()
        val_m = evaluate(model, setup.val_loader, device, dtype, tcfg.channels_last) if setup.val_loader else {}
        secs = train_m["seconds"] + time.perf_counter() - t_val
        result.seconds += secs
        row = {"epoch": epoch + 1, "train_loss": train_m["loss"], "train_top1": train_m["top1"],
               "val_loss": val_m.get("loss"), "val_top1": val_m.get("top1"), "val_top5": val_m.get("top5"),
               "lr": steps[-1][1], "momentum": steps[-1][2], "epoch_seconds": round(secs, 3),
               "images_per_second": round(train_m["images"] / train_m["seconds"], 1)}
        result.history.append(row)
        score = row["val_top1"] if row["val_top1"] is not None else -row["train_loss"]
        if score > result.best_top1:
            result.best_top1, result.best_epoch = score, epoch + 1
            result.best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            if checkpoint_dir is not None:
                ckpt.save({"model": result.best_state, "epoch": epoch + 1, "val_top1": row["val_top1"],
                           "config_hash": config_id, "mlflow_run_id": run_id}, checkpoint_dir / "best.pt")
        stopping = should_stop is not None and dist.any_(should_stop())
        if checkpoint_dir is not None and ((epoch + 1) % tcfg.checkpoint_every == 0 or epoch + 1 == tcfg.epochs
                                           or stopping):
            save_last(epoch + 1)
        if logger is not None:
            if epoch + 1 not in logged_epochs:
                logger.log(_row_metrics(row), step=epoch + 1)
            for step, lr, momentum in steps:
                if step not in logged_steps:
                    logger.log({"lr": lr, "momentum": momentum}, step=step)
            logger.flush()
        if history_path is not None:
            write_history(result.history, history_path)
        val_txt = (f"val loss {row['val_loss']:.4f} top1 {row['val_top1']:.4f} top5 {row['val_top5']:.4f}"
                   if row["val_top1"] is not None else "no validation split")
        if dist.is_main():
            print(f"epoch {epoch + 1}/{tcfg.epochs}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.4f}, "
                  f"{val_txt}, lr {row['lr']:.2e}, {secs:.1f}s ({row['images_per_second']:.0f} img/s)", flush=True)
        if on_epoch is not None:
            on_epoch(epoch, row)
        if stopping and epoch + 1 < tcfg.epochs:
            raise Interrupted(f"stopped after epoch {epoch + 1}; run `onecycle train` (or `dvc repro`) again to resume")
    return result


def resolve_max_lr(params) -> float:
    """``schedule.max_lr``, or the LR finder's chosen suggestion when it is ``auto``."""
    if params.schedule.max_lr != "auto":
        return float(params.schedule.max_lr)
    from .lr_find import read_suggestion

    return read_suggestion()


def _lr_find_run_id() -> str | None:
    from .lr_find import REPORT

    try:
        return json.loads(REPORT.read_text()).get("mlflow_run_id")
    except (OSError, ValueError):
        return None


def find_resume_state(params, config_id: str, checkpoint_dir: Path = CHECKPOINT_DIR,
                      move_aside: bool = True) -> dict | None:
    """The checkpoint to continue from, or None to start fresh (moving a foreign one aside, with a warning).

    Under DDP every rank reads the same checkpoint; only rank 0 (``move_aside``) moves files.
    """
    last = checkpoint_dir / "last.pt"
    if not last.exists():
        return None
    if not params.train.resume:
        log.warning("train.resume is false: starting fresh; the old checkpoints move to %s", checkpoint_dir / "previous")
        if move_aside:
            _move_aside(checkpoint_dir)
        return None
    state = ckpt.load(last)  # a corrupt file is an error here, never a silent restart
    if state.get("config_hash") != config_id:
        log.warning("%s is from a different configuration (hash %s, now %s): starting fresh; it moves to %s",
                    last, state.get("config_hash"), config_id, checkpoint_dir / "previous")
        if move_aside:
            _move_aside(checkpoint_dir)
        return None
    if state.get("finished") and _run_finished(state.get("mlflow_run_id"), params.mlflow.experiment):
        log.info("the run in %s finished; training again from scratch", last)
        if move_aside:
            _move_aside(checkpoint_dir)
        return None
    log.info("resuming from %s: epoch %d of %d, MLflow run %s", last, state["epoch"], params.train.epochs,
             state.get("mlflow_run_id"))
    return state


def _move_aside(checkpoint_dir: Path) -> None:
    previous = checkpoint_dir / "previous"
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir(parents=True)
    for f in checkpoint_dir.glob("*.pt"):
        f.replace(previous / f.name)


def _run_finished(run_id: str | None, experiment: str) -> bool:
    if not run_id:
        return True
    import mlflow

    from .tracking import configure

    configure(experiment)

    try:
        return mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"
    except Exception:
        return True


def model_bundle(params, info, state_dict: dict) -> dict[str, Any]:
    """What models/model.pt holds: best weights plus what rebuilds the model and its eval transforms."""
    return {
        "format": "onecycle-model/1", "state_dict": state_dict,
        "model": params.model.model_dump(mode="json"),
        "dataset": {"name": info.name, "classes": info.classes, "image_shape": list(info.image_shape),
                    "mean": info.mean, "std": info.std},
        "augment_eval": params.augment.model_dump(mode="json")["eval"],
    }


def log_final_model(params, setup: Setup, state_dict: dict) -> str | None:
    """Log the best model with ``mlflow.pytorch.log_model`` (softmax output, signature, input example), registered.

    MLflow saves it in its "pt2" format (``torch.export``): loading it runs no pickled code.
    """
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    from .models import build_model

    model = build_model(params.model, setup.info.num_classes, setup.info.in_channels)
    model.load_state_dict(state_dict)
    served = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    loader = setup.val_loader or setup.train_loader
    # Two examples: with one, torch.export (MLflow's default "pt2" format) would fix the batch size to 1.
    example = torch.stack([loader.dataset[i][0] for i in range(2)]).numpy().astype(np.float32)
    with torch.no_grad():
        probs = served(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, probs)
    info = mlflow.pytorch.log_model(
        served, name="model", signature=signature, input_example=example,
        registered_model_name=params.mlflow.registered_model, serialization_format="pt2",
        # what `onecycle predict --model-uri` needs to preprocess images and name classes
        metadata={"onecycle": {k: v for k, v in model_bundle(params, setup.info, {}).items() if k != "state_dict"}},
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
    )
    return info.model_uri


def _relaunch_under_torchrun(params, args) -> int:
    """``train.nproc_per_node`` > 1 outside torchrun: run this same command as N DDP processes on this machine."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={params.train.nproc_per_node}", "-m", "onecycle", "train", "--params", args.params]
    log.info("train.nproc_per_node is %d: %s", params.train.nproc_per_node, " ".join(cmd))
    return subprocess.call(cmd)


def _run(params, args) -> int:
    import mlflow

    from .models import model_summary
    from .tracking import configure, log_params_flat, provenance_tags, quiet_mlflow

    if params.train.nproc_per_node > 1 and not dist.launched():
        return _relaunch_under_torchrun(params, args)
    max_lr = resolve_max_lr(params)
    config_id = config_hash(params, max_lr)
    main = dist.is_main()
    resume_state = find_resume_state(params, config_id, move_aside=main)
    setup = build_setup(params)
    if not main:  # other DDP ranks: train in step with rank 0, which alone logs, checkpoints and reports
        try:
            with StopSignals() as stop:
                fit(params, setup, max_lr, resume_state=resume_state, config_id=config_id, progress=False,
                    should_stop=stop)
        finally:
            dist.barrier()
            dist.shutdown()
        return 0
    quiet_mlflow()
    configure(params.mlflow.experiment)
    run_id = resume_state.get("mlflow_run_id") if resume_state else None
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else f"train-{config_id[:6]}")
    run_id = run.info.run_id
    logger = RunLogger(run_id)
    try:
        if resume_state is None:
            mlflow.set_tags({**provenance_tags(params.data.dataset, device_name(setup.device)), "stage": "train",
                             "config_hash": config_id, "processes": str(dist.world_size())})
            lr_run = _lr_find_run_id()
            if lr_run:
                mlflow.set_tag("lr_find_run_id", lr_run)
            from .lr_find import PLOT

            if PLOT.is_file():
                mlflow.log_artifact(str(PLOT), artifact_path="lr_find")
            log_params_flat({**params.flat(), "schedule.max_lr_used": max_lr})
            sample = setup.train_loader.dataset[0][0]
            mlflow.log_text(model_summary(setup.net, (1, *sample.shape)), "model_summary.txt")
        else:
            mlflow.set_tag("resumed_from_epoch", str(resume_state["epoch"]))
        print(f"train: {params.model.name} (width {params.model.width}) on {setup.info.name}, {params.train.epochs} "
              f"epochs of {len(setup.train_loader)} steps, max_lr {max_lr:.3g}, device {device_name(setup.device)}"
              f"{f' x {dist.world_size()} processes' if dist.world_size() > 1 else ''}; MLflow run {run_id}")
        with StopSignals() as stop:
            result = fit(params, setup, max_lr, logger=logger, checkpoint_dir=CHECKPOINT_DIR,
                         resume_state=resume_state, run_id=run_id, config_id=config_id, history_path=HISTORY_CSV,
                         should_stop=stop)
    except DivergenceError as exc:
        _finish_failed(params, setup, run_id, str(exc), logger)
        raise
    except BaseException as exc:
        logger.flush()
        mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt | Interrupted) else "FAILED")
        raise
    finally:
        dist.barrier()
    _finish(params, setup, result, run_id, logger)
    dist.shutdown()
    return 0


def _write_outputs(params, setup: Setup, state_dict: dict, summary: dict) -> None:
    MODEL_PATH.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save(model_bundle(params, setup.info, state_dict), MODEL_PATH)
    atomic_write_text(TRAIN_JSON, json.dumps(summary, indent=2) + "\n")


def _finish(params, setup: Setup, result: FitResult, run_id: str, logger: RunLogger) -> None:
    import mlflow

    last = result.history[-1]
    summary = {"best_val_top1": result.best_top1 if result.best_top1 >= 0 else None, "best_epoch": result.best_epoch,
               "final_train_loss": last["train_loss"], "final_val_top1": last["val_top1"],
               "epochs": len(result.history), "total_seconds": round(result.seconds, 1), "mlflow_run_id": run_id}
    _write_outputs(params, setup, result.best_state, summary)
    logger.flush()
    mlflow.log_metrics({"best/val_top1": max(result.best_top1, 0.0), "best/epoch": result.best_epoch,
                        "total_seconds": result.seconds})
    if params.mlflow.log_checkpoints != "none":
        names = ["best.pt"] if params.mlflow.log_checkpoints == "best" else ["best.pt", "last.pt"]
        for name in names:
            if (CHECKPOINT_DIR / name).is_file():
                mlflow.log_artifact(str(CHECKPOINT_DIR / name), artifact_path="checkpoints")
    mlflow.log_artifact(str(HISTORY_CSV))
    mlflow.log_artifact(str(TRAIN_JSON))
    uri = log_final_model(params, setup, result.best_state)
    mlflow.end_run()
    print(f"train: best val top1 {summary['best_val_top1']} at epoch {result.best_epoch}; "
          f"{MODEL_PATH}, {TRAIN_JSON}, {HISTORY_CSV}; model {uri}")


def _finish_failed(params, setup: Setup, run_id: str, reason: str, logger: RunLogger) -> None:
    """Divergence: keep the best checkpoint and model, mark the run FAILED with the reason."""
    import mlflow

    logger.flush()
    best = CHECKPOINT_DIR / "best.pt"
    if best.is_file():
        state = ckpt.load(best)
        _write_outputs(params, setup, state["model"], {"diverged": True, "reason": reason, "mlflow_run_id": run_id,
                                                       "best_epoch": state.get("epoch")})
    mlflow.set_tag("failure_reason", reason)
    mlflow.end_run(status="FAILED")


def main(argv=None) -> int:
    return run_command("train", __doc__.splitlines()[0], argv, _run)


if __name__ == "__main__":
    raise SystemExit(main())
