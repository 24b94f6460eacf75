"""train stage: the epoch loop (:mod:`onecycle.training.loop`) as a tracked, checkpointed, resumable MLflow run.

Writes ``models/model.pt``, ``reports/train.json``, ``reports/runs.json``, ``reports/history.csv``,
``reports/schedule.csv`` and ``checkpoints/``; re-launches itself under torchrun for ``train.nproc_per_node`` > 1.

Resume: a ``checkpoints/last.pt`` of the same configuration (a hash of every key that changes the result) and the
same architecture, data size, device, precision and processes (:func:`resume_identity`) is continued in the same
MLflow run at the exact step; any other starts fresh, its checkpoints moved to ``checkpoints/previous/``. One
``onecycle train`` at a time per workspace (a lock in ``checkpoints/``). What the run records lives in
:mod:`onecycle.tracking.training_run`.

Finalization is a list of named steps (:func:`finalize_steps`), each recorded in ``checkpoints/finalize.json``
when done; the run is FINISHED only after all of them. If one fails or is interrupted, the next ``onecycle train``
completes only the missing steps, in the same MLflow run, without training.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable

from onecycle.core.errors import OneCycleError
from onecycle.core.files import atomic_write_text
from onecycle.core.paths import Workspace
from onecycle.core.redact import one_line
from onecycle.core.words import count
from onecycle.data.store import load_info
from onecycle.serving.modelfile import save_model
from onecycle.serving.provenance import trained_by
from onecycle.stages.command import run_command
from onecycle.tracking import runs, store, training_run
from onecycle.training import checkpoint as ckpt
from onecycle.training import distributed as dist
from onecycle.training.engine import DivergenceError, Setup, device_name, train_step
from onecycle.training.loop import FitResult, Interrupted, StopSignals, config_hash, fit
from onecycle.training.lr_report import lr_find_run_id, measured_on, resolve_max_lr
from onecycle.training.records import row_metrics
from onecycle.training.resume import FINALIZE_STATE, find_resume_state, read_finalize, resume_identity, workspace_lock

log = logging.getLogger(__name__)


def _relaunch_under_torchrun(params, args) -> int:
    """``train.nproc_per_node`` > 1 outside torchrun: run this same command as N DDP processes on this machine."""
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={params.train.nproc_per_node}", "-m", "onecycle", "train", "--params", args.params]
    log.info("train.nproc_per_node is %d: %s", params.train.nproc_per_node, " ".join(cmd))
    return dist.run_forwarding_signals(cmd)


def run(params, ws: Workspace, *, step_fn: Callable = train_step, progress: bool = True,
        finalize_hook: Callable[[str], None] | None = None) -> int:
    """The train stage in ``ws``: resume or start, fit, write the outputs, finish the MLflow run.

    ``step_fn`` (one optimizer step, ``engine.train_step`` by default) and ``finalize_hook`` (called with each
    finalization step's name before it runs) are the seams tests inject faults through.
    """
    params = params.for_data(ws.root)
    measured_now = None  # what an LR report must have been measured on, to be used for max_lr: auto
    if params.schedule.max_lr == "auto":
        measured_now = measured_on(params.flat(), load_info(params.data, ws.root).digest)
    max_lr = resolve_max_lr(params.schedule.max_lr, ws.lr_find_json, measured_now=measured_now)
    config_id = config_hash(params.flat(), max_lr)
    main = dist.is_main()
    with workspace_lock(ws) if main else contextlib.nullcontext():
        return _run(params, ws, max_lr, config_id, main, step_fn, progress, finalize_hook)


def _run(params, ws: Workspace, max_lr: float, config_id: str, main: bool, step_fn: Callable, progress: bool,
         finalize_hook: Callable[[str], None] | None) -> int:
    setup = training_run.prepare(params, ws.root)
    identity = resume_identity(setup)
    # rank 0 decides and sends its checkpoint to the other ranks (on other machines they have none)
    finished = training_run.run_finished(params.mlflow.experiment, ws.root)
    resume_state = dist.from_main(find_resume_state(params.train, config_id, ws.checkpoints, finished, identity=identity)
                                  if main else None)
    if not main:  # other DDP ranks: train in step with rank 0, which alone logs, checkpoints and reports
        try:
            with StopSignals() as stop:
                fit(setup, max_lr, train=params.train, schedule=params.schedule, optimizer=params.optimizer,
                    resume_state=resume_state, progress=False, should_stop=stop, step_fn=step_fn)
        finally:
            dist.sync_or_leave()
            dist.shutdown()
        return 0
    experiment_id = store.configure(params.mlflow.experiment, ws.root)
    run_id = training_run.reusable_run(resume_state.get("mlflow_run_id") if resume_state else None, experiment_id)
    active = runs.start_run(run_id, None if run_id else runs.run_name(f"train-{config_id[:6]}"),
                            system_metrics=params.mlflow.system_metrics)
    new_run = run_id is None
    run_id = active.info.run_id
    found = training_run.run_datasets(params, ws.root)
    logger = runs.RunLogger(run_id, datasets=found)  # train/* and val/* metrics name their dataset
    try:
        if resume_state is None or new_run:
            training_run.record_training_start(params, setup, ws, max_lr, found, {"processes": str(dist.world_size())})
        if resume_state is not None:
            training_run.reconcile_metrics(params, max_lr, len(setup.train_loader), resume_state, logger)
        print(f"train: {params.model.name} (width {params.model.width}) on {setup.info.name}, "
              f"{count(params.train.epochs, 'epoch')} of {count(len(setup.train_loader), 'step')}, max_lr {max_lr:.3g}, "
              f"device {device_name(setup.device)}, "
              f"{setup.precision}"
              f"{f' x {dist.world_size()} processes' if dist.world_size() > 1 else ''}; MLflow run {run_id}")
        hooks = training_run.checkpointing_hooks(ws, config_id, run_id, logger, resume_state is not None, identity)
        with StopSignals() as stop:  # a finished checkpoint: fit trains nothing and returns its result
            result = fit(setup, max_lr, train=params.train, schedule=params.schedule, optimizer=params.optimizer,
                         hooks=hooks, resume_state=resume_state, should_stop=stop, progress=progress, step_fn=step_fn)
    except DivergenceError as exc:
        _finish_failed(params, setup, ws, run_id, str(exc), logger)
        raise
    except Interrupted as exc:
        logger.flush()
        runs.end_run_quietly("KILLED")
        raise Interrupted(f"{exc}; the state is in {ws.checkpoints / 'last.pt'}: "
                          f"{training_run.how_to_resume(ws)}") from None
    except BaseException as exc:
        logger.flush()
        runs.end_run_quietly("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        dist.sync_or_leave()
    if new_run and resume_state is not None and resume_state.get("finished"):  # the checkpoint names the run finalization goes to
        ckpt.save({**ckpt.load(ws.checkpoints / "last.pt"), "mlflow_run_id": run_id}, ws.checkpoints / "last.pt")
    _finish(params, setup, ws, result, run_id, logger, finalize_hook)
    dist.shutdown()
    return 0


def _write_outputs(params, setup: Setup, ws: Workspace, state_dict: dict, summary: dict, run_id: str) -> None:
    """models/model.pt, reports/train.json (DVC metrics: numbers only) and reports/runs.json (the MLflow run ids
    of these outputs: the training's, and the LR range test's it used)."""
    save_model(params.model, params.augment, setup.info, state_dict, ws.model,
               trained=trained_by(run_id, runs.run_name("") or None))  # predict and the demo name it
    atomic_write_text(ws.train_json, json.dumps(summary, indent=2) + "\n")
    lr_run = lr_find_run_id(ws.lr_find_json)
    run_ids = {"train": run_id, "lr_find": lr_run if runs.run_exists(lr_run) else None}  # ids that resolve here
    atomic_write_text(ws.runs_json, json.dumps(run_ids, indent=2) + "\n")


def finalize_steps(params, setup: Setup, ws: Workspace, result: FitResult, run_id: str,
                   logger: runs.RunLogger) -> list[tuple[str, Callable[[], object]]]:
    """The named steps after the last epoch, in order; each is safe to run again and recorded when done."""
    from onecycle.serving.network import log_network

    last = result.history[-1]
    summary = {"best_val_top1": result.best_top1 if result.best_top1 >= 0 else None, "best_epoch": result.best_epoch,
               "final_train_loss": last["train_loss"], "final_val_top1": last["val_top1"],
               "epochs": len(result.history), "total_seconds": round(result.seconds, 1)}

    def checkpoints() -> str | None:
        """Each checkpoint kept (``mlflow.log_checkpoints``) as a logged model of the run at its epoch, with that
        epoch's metrics (the run's Logged models tab); returns their model ids."""
        if params.mlflow.log_checkpoints == "none":
            return None
        rows = {int(row["epoch"]): row for row in result.history}
        kept = {"best": result.best_epoch}
        if params.mlflow.log_checkpoints == "all":
            kept["last"] = int(last["epoch"])
        ids = []
        for which, epoch in kept.items():
            path = ws.checkpoints / f"{which}.pt"
            if path.is_file() and epoch in rows:
                ids.append(runs.log_checkpoint_model(path, run_id, f"checkpoint-{which}", epoch,
                                                     row_metrics(rows[epoch]), logger,
                                                     tags={"checkpoint": which}))
        return " ".join(ids) or None

    def reports() -> None:
        runs.log_artifact(ws.history_csv)
        runs.log_artifact(ws.schedule_csv)
        runs.log_artifact(ws.train_json)

    return [("outputs", lambda: _write_outputs(params, setup, ws, result.best_state, summary, run_id)),
            ("metrics", lambda: training_run.log_best(logger, result.best_top1, result.best_epoch, result.seconds)),
            ("checkpoints", checkpoints), ("reports", reports),
            ("network", lambda: log_network(setup, result.best_state, model=params.model, augment=params.augment)),
            ("end_run", training_run.end_finished)]


def _finish(params, setup: Setup, ws: Workspace, result: FitResult, run_id: str, logger: runs.RunLogger,
            finalize_hook: Callable[[str], None] | None = None) -> None:
    """Run the finalization steps not yet done for ``run_id``; the run is ended FINISHED by the last one.

    On any failure or interrupt the run is marked KILLED/FAILED and the message says that running the
    stage again completes it (without training again).
    """
    record = read_finalize(ws.checkpoints)
    if record.get("run_id") != run_id:
        record = {"run_id": run_id, "done": {}}
    name = "outputs"
    try:
        for name, step in finalize_steps(params, setup, ws, result, run_id, logger):
            if name in record["done"]:
                continue
            if finalize_hook is not None:
                finalize_hook(name)
            value = step()
            record["done"][name] = value if isinstance(value, str | None) else str(value)
            atomic_write_text(ws.checkpoints / FINALIZE_STATE, json.dumps(record, indent=2) + "\n")
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt | Interrupted)
        logger.flush()
        runs.end_run_quietly("KILLED" if interrupted else "FAILED")
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else one_line(exc)[:300] or type(exc).__name__
        again = ("run the experiment again" if training_run.in_dvc_temp_copy(ws) else
                 "run `onecycle train` (or `dvc repro`) again to complete it without training again")
        msg = (f"the training finished but its finalization stopped at step '{name}' ({what}); the trained state is "
               f"in {ws.checkpoints / 'last.pt'}: {again} (MLflow run {run_id})")
        if training_run.in_dvc_temp_copy(ws):
            msg += "; this temporary copy is deleted by DVC, so it cannot be completed"
        if interrupted:
            raise Interrupted(msg) from None
        if isinstance(exc, Exception):
            raise OneCycleError(msg) from exc
        raise
    uri = record["done"].get("network")
    print(f"train: best val top1 {result.best_top1 if result.best_top1 >= 0 else None} at epoch {result.best_epoch}; "
          f"{ws.model}, {ws.train_json}, {ws.history_csv}; model {uri}")


def _finish_failed(params, setup: Setup, ws: Workspace, run_id: str, reason: str, logger: runs.RunLogger) -> None:
    """Divergence: keep the best checkpoint and model, mark the run FAILED with the reason."""
    logger.flush()
    best = ws.checkpoints / "best.pt"
    if best.is_file():
        state = ckpt.load(best)
        _write_outputs(params, setup, ws, state["model"], {"diverged": True, "reason": reason,
                                                           "best_epoch": state.get("epoch")}, run_id)
    training_run.mark_failed(reason)


def _main(params, args) -> int:
    if params.train.nproc_per_node > 1 and not dist.launched():
        return _relaunch_under_torchrun(params, args)
    return run(params, Workspace())


def main(argv=None) -> int:
    return run_command("train", __doc__.splitlines()[0], argv, _main)


if __name__ == "__main__":
    raise SystemExit(main())
