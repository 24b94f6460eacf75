"""train stage: the One Cycle epoch loop (``loop.py``) as a tracked, checkpointed, resumable MLflow run.

This module owns the stage around the loop: which checkpoint to resume from, the MLflow run (tags,
params, per-epoch and per-step metrics, artifacts, the logged and registered model), the files the
stage writes (``models/model.pt``, ``reports/train.json``, ``reports/history.csv``, ``checkpoints/``)
and the re-launch under torchrun for ``train.nproc_per_node`` > 1.

Resume: when ``checkpoints/last.pt`` holds the same configuration (a hash of every key that changes
the result), training continues from it in the same MLflow run with the schedule at the exact step.
A checkpoint of a *different* configuration is never used: training starts fresh with a warning and
the old checkpoints are moved to ``checkpoints/previous/``. ``train.resume: false`` always starts fresh.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from . import checkpoint as ckpt
from . import distributed as dist
from . import tracking
from .cli import run_command
from .engine import DivergenceError, Setup, build_setup, device_name, train_step
from .files import atomic_write_text
from .loaders import SPLIT_SEED
from .loop import FitHooks, FitResult, Interrupted, StopSignals, config_hash, fit, history_csv, row_metrics
from .modelfile import save_model
from .paths import Workspace
from .rangetest import lr_find_run_id, resolve_max_lr

log = logging.getLogger(__name__)


def find_resume_state(params, config_id: str, checkpoint_dir: Path, root: Path | None = None,
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
    if state.get("finished") and _run_finished(state.get("mlflow_run_id"), params.mlflow.experiment, root):
        log.info("the run in %s finished; training again from scratch", last)
        if move_aside:
            _move_aside(checkpoint_dir)
        return None
    log.info("resuming from %s: epoch %d of %d, MLflow run %s", last, state["epoch"], params.train.epochs,
             state.get("mlflow_run_id"))
    best = checkpoint_dir / "best.pt"
    if best.is_file():
        state["best_model"] = ckpt.load(best)["model"]
    return state


def _move_aside(checkpoint_dir: Path) -> None:
    previous = checkpoint_dir / "previous"
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir(parents=True)
    for f in checkpoint_dir.glob("*.pt"):
        f.replace(previous / f.name)


def _run_finished(run_id: str | None, experiment: str, root: Path | None) -> bool:
    if not run_id:
        return True
    tracking.configure(experiment, root)
    try:
        return tracking.mlflow().MlflowClient().get_run(run_id).info.status == "FINISHED"
    except Exception:
        return True


def stage_hooks(ws: Workspace, config_id: str, run_id: str, logger: tracking.RunLogger, resumed: bool) -> FitHooks:
    """Checkpoints into ``ws.checkpoints``; per-epoch and per-step metrics to MLflow; reports/history.csv."""
    def stamp(state: dict) -> dict:
        return {**state, "config_hash": config_id, "mlflow_run_id": run_id}

    logged_epochs = logger.existing_steps("val/top1") | logger.existing_steps("train/loss")
    logged_steps = logger.existing_steps("lr") if resumed else set()

    def on_epoch(epoch: int, row: dict, steps: list, history: list[dict]) -> None:
        if epoch + 1 not in logged_epochs:
            logger.log(row_metrics(row), step=epoch + 1)
        for step, lr, momentum in steps:
            if step not in logged_steps:
                logger.log({"lr": lr, "momentum": momentum}, step=step)
        logger.flush()
        atomic_write_text(ws.history_csv, history_csv(history))

    return FitHooks(save_last=lambda s: ckpt.save(stamp(s), ws.checkpoints / "last.pt"),
                    save_best=lambda s: ckpt.save(stamp(s), ws.checkpoints / "best.pt"),
                    on_epoch=on_epoch)


def _relaunch_under_torchrun(params, args) -> int:
    """``train.nproc_per_node`` > 1 outside torchrun: run this same command as N DDP processes on this machine."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={params.train.nproc_per_node}", "-m", "onecycle", "train", "--params", args.params]
    log.info("train.nproc_per_node is %d: %s", params.train.nproc_per_node, " ".join(cmd))
    return subprocess.call(cmd)


def run(params, ws: Workspace, *, step_fn: Callable = train_step, progress: bool = True) -> int:
    """The train stage in ``ws``: resume or start, fit, write the outputs, finish the MLflow run.

    ``step_fn`` (one optimizer step, ``engine.train_step`` by default) is the seam tests inject faults through.
    """
    max_lr = resolve_max_lr(params, ws.lr_find_json)
    config_id = config_hash(params, max_lr)
    main = dist.is_main()
    resume_state = find_resume_state(params, config_id, ws.checkpoints, ws.root, move_aside=main)
    setup = build_setup(params, root=ws.root)
    if not main:  # other DDP ranks: train in step with rank 0, which alone logs, checkpoints and reports
        try:
            with StopSignals() as stop:
                fit(params, setup, max_lr, resume_state=resume_state, progress=False, should_stop=stop,
                    step_fn=step_fn)
        finally:
            dist.barrier()
            dist.shutdown()
        return 0
    mlflow = tracking.mlflow()
    tracking.configure(params.mlflow.experiment, ws.root)
    run_id = resume_state.get("mlflow_run_id") if resume_state else None
    active = tracking.start_run(run_id, None if run_id else tracking.run_name(f"train-{config_id[:6]}"),
                                system_metrics=params.mlflow.system_metrics)
    run_id = active.info.run_id
    logger = tracking.RunLogger(run_id)
    try:
        if resume_state is None:
            _start_run_record(params, setup, ws, config_id, max_lr)
        else:
            mlflow.set_tag("resumed_from_epoch", str(resume_state["epoch"]))
        print(f"train: {params.model.name} (width {params.model.width}) on {setup.info.name}, {params.train.epochs} "
              f"epochs of {len(setup.train_loader)} steps, max_lr {max_lr:.3g}, device {device_name(setup.device)}"
              f"{f' x {dist.world_size()} processes' if dist.world_size() > 1 else ''}; MLflow run {run_id}")
        hooks = stage_hooks(ws, config_id, run_id, logger, resume_state is not None)
        with StopSignals() as stop:
            result = fit(params, setup, max_lr, hooks=hooks, resume_state=resume_state, should_stop=stop,
                         progress=progress, step_fn=step_fn)
    except DivergenceError as exc:
        _finish_failed(params, setup, ws, run_id, str(exc), logger)
        raise
    except Interrupted as exc:
        logger.flush()
        mlflow.end_run(status="KILLED")
        raise Interrupted(f"{exc}; the state is in {ws.checkpoints / 'last.pt'}: run `onecycle train` (or "
                          "`dvc repro`) again to resume") from None
    except BaseException as exc:
        logger.flush()
        mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        dist.barrier()
    _finish(params, setup, ws, result, run_id, logger)
    dist.shutdown()
    return 0


def _start_run_record(params, setup: Setup, ws: Workspace, config_id: str, max_lr: float) -> None:
    """What a new training run records once: provenance tags, params, the LR finder's run and plot, the model."""
    from .models import model_summary

    mlflow = tracking.mlflow()
    mlflow.set_tags({**tracking.provenance_tags(params.data.dataset, device_name(setup.device), ws.root),
                     "stage": "train", "config_hash": config_id, "processes": str(dist.world_size())})
    lr_run = lr_find_run_id(ws.lr_find_json)
    if lr_run:
        mlflow.set_tag("lr_find_run_id", lr_run)
    if ws.lr_find_png.is_file():
        mlflow.log_artifact(str(ws.lr_find_png), artifact_path="lr_find")
    tracking.log_params_flat({**params.flat(), "schedule.max_lr_used": max_lr})
    splits = ["train", "val"] if params.data.val_size > 0 else ["train"]
    tracking.log_datasets(tracking.datasets(params.data, ws.root, splits, split_seed=SPLIT_SEED))
    sample = setup.train_loader.dataset[0][0]
    mlflow.log_text(model_summary(setup.net, (1, *sample.shape)), "model_summary.txt")


def _write_outputs(params, setup: Setup, ws: Workspace, state_dict: dict, summary: dict) -> None:
    save_model(params, setup.info, state_dict, ws.model)
    atomic_write_text(ws.train_json, json.dumps(summary, indent=2) + "\n")


def _finish(params, setup: Setup, ws: Workspace, result: FitResult, run_id: str, logger: tracking.RunLogger) -> None:
    from .serving import log_final_model

    mlflow = tracking.mlflow()
    last = result.history[-1]
    summary = {"best_val_top1": result.best_top1 if result.best_top1 >= 0 else None, "best_epoch": result.best_epoch,
               "final_train_loss": last["train_loss"], "final_val_top1": last["val_top1"],
               "epochs": len(result.history), "total_seconds": round(result.seconds, 1), "mlflow_run_id": run_id}
    _write_outputs(params, setup, ws, result.best_state, summary)
    logger.flush()
    mlflow.log_metrics({"best/val_top1": max(result.best_top1, 0.0), "best/epoch": result.best_epoch,
                        "total_seconds": result.seconds})
    if params.mlflow.log_checkpoints != "none":
        names = ["best.pt"] if params.mlflow.log_checkpoints == "best" else ["best.pt", "last.pt"]
        for name in names:
            if (ws.checkpoints / name).is_file():
                mlflow.log_artifact(str(ws.checkpoints / name), artifact_path="checkpoints")
    mlflow.log_artifact(str(ws.history_csv))
    mlflow.log_artifact(str(ws.train_json))
    uri = log_final_model(params, setup, result.best_state)
    mlflow.end_run()
    print(f"train: best val top1 {summary['best_val_top1']} at epoch {result.best_epoch}; "
          f"{ws.model}, {ws.train_json}, {ws.history_csv}; model {uri}")


def _finish_failed(params, setup: Setup, ws: Workspace, run_id: str, reason: str, logger: tracking.RunLogger) -> None:
    """Divergence: keep the best checkpoint and model, mark the run FAILED with the reason."""
    mlflow = tracking.mlflow()
    logger.flush()
    best = ws.checkpoints / "best.pt"
    if best.is_file():
        state = ckpt.load(best)
        _write_outputs(params, setup, ws, state["model"], {"diverged": True, "reason": reason, "mlflow_run_id": run_id,
                                                           "best_epoch": state.get("epoch")})
    mlflow.set_tag("failure_reason", reason)
    mlflow.end_run(status="FAILED")


def _main(params, args) -> int:
    if params.train.nproc_per_node > 1 and not dist.launched():
        return _relaunch_under_torchrun(params, args)
    return run(params, Workspace())


def main(argv=None) -> int:
    return run_command("train", __doc__.splitlines()[0], argv, _main)


if __name__ == "__main__":
    raise SystemExit(main())
