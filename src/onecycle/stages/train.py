"""train stage: the One Cycle epoch loop (:mod:`onecycle.training.loop`) as a tracked, checkpointed, resumable MLflow run.

This module owns the stage around the loop: which checkpoint to resume from, the MLflow run (tags,
params, per-epoch and per-step metrics, artifacts, the logged network), the files the
stage writes (``models/model.pt``, ``reports/train.json``, ``reports/runs.json``, ``reports/history.csv``,
``reports/schedule.csv``, ``checkpoints/``)
and the re-launch under torchrun for ``train.nproc_per_node`` > 1.

Resume: when ``checkpoints/last.pt`` holds the same configuration (a hash of every key that changes
the result), training continues from it in the same MLflow run with the schedule at the exact step.
A checkpoint of a *different* configuration is never used: training starts fresh with a warning and
the old checkpoints are moved to ``checkpoints/previous/<their config hash>/`` (never deleted). The same
holds when what the configuration does not say changed: the architecture (code), the dataset's size, the
resolved device, precision or number of processes (:func:`resume_identity`). ``train.resume: false`` always
starts fresh. One ``onecycle train`` at a time per workspace: a lock in ``checkpoints/`` refuses a second.

Finalization (the model file, reports, the checkpoints as logged models, the logged network, the run's end; the
registered classifier is made after evaluate, by the publish stage) is a list of named steps (:func:`finalize_steps`),
each recorded in ``checkpoints/finalize.json`` when
done; the run is FINISHED only after all of them. If one fails or is interrupted, the next ``onecycle train``
sees the finished ``last.pt`` and completes only the missing steps, in the same MLflow run, without training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from onecycle.core.errors import OneCycleError
from onecycle.core.files import atomic_write_text
from onecycle.core.paths import Workspace
from onecycle.core.redact import one_line
from onecycle.data.loaders import SPLIT_SEED
from onecycle.data.store import load_info
from onecycle.serving.modelfile import save_model
from onecycle.stages.command import run_command
from onecycle.tracking import runs, store
from onecycle.training import checkpoint as ckpt
from onecycle.training import distributed as dist
from onecycle.training.engine import DivergenceError, Setup, build_setup, device_name, train_step
from onecycle.training.loop import FitHooks, FitResult, Interrupted, StopSignals, config_hash, fit
from onecycle.training.lr_report import lr_find_run_id, measured_on, resolve_max_lr
from onecycle.training.optimizers import OPTIMIZERS
from onecycle.training.records import Step, history_csv, row_metrics, schedule_csv
from onecycle.training.resume import FINALIZE_STATE, find_resume_state, read_finalize, resume_identity, workspace_lock
from onecycle.training.schedule import check_fits, lr_and_momentum_at

log = logging.getLogger(__name__)



STEPS_LOG = "schedule_steps.csv"  # every step's LR and momentum, in checkpoints/ beside last.pt (resume)


def _read_steps(path: Path) -> dict[int, Step]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    steps = {}
    for line in lines:
        try:
            s, lr, m = line.split(",")
            steps[int(s)] = Step(int(s), float(lr), float(m))
        except ValueError:  # a line cut short by a kill mid-write
            continue
    return steps


def stage_hooks(ws: Workspace, config_id: str, run_id: str, logger: runs.RunLogger, resumed: bool,
                identity: dict | None = None) -> FitHooks:
    """Checkpoints into ``ws.checkpoints``; per-epoch and per-step metrics to MLflow; reports/history.csv and
    reports/schedule.csv (every step so far, from ``checkpoints/schedule_steps.csv`` on resume)."""
    def stamp(state: dict) -> dict:
        return {**state, "config_hash": config_id, "mlflow_run_id": run_id,
                **({"identity": identity} if identity is not None else {})}

    logged_epochs = logger.existing_steps("val/top1") | logger.existing_steps("train/loss")
    logged_steps = logger.existing_steps("lr") if resumed else set()
    steps_log = ws.checkpoints / STEPS_LOG
    all_steps = _read_steps(steps_log) if resumed else {}
    if not resumed:
        steps_log.parent.mkdir(parents=True, exist_ok=True)
        steps_log.write_text("")

    def on_epoch(epoch: int, row: dict, steps: list[Step], history: list[dict]) -> None:
        runs.log_epoch(logger, row, steps, skip_epochs=logged_epochs, skip_steps=logged_steps)
        atomic_write_text(ws.history_csv, history_csv(history))
        with steps_log.open("a") as f:
            f.writelines(f"{s.step},{s.lr!r},{s.momentum!r}\n" for s in steps)
        all_steps.update({s.step: s for s in steps})
        atomic_write_text(ws.schedule_csv, schedule_csv([all_steps[s] for s in sorted(all_steps)]))

    return FitHooks(save_last=lambda s: ckpt.save(stamp(s), ws.checkpoints / "last.pt"),
                    save_best=lambda s: ckpt.save(stamp(s), ws.checkpoints / "best.pt"),
                    on_epoch=on_epoch)


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
    setup = build_setup(params.data, params.augment, params.model, params.train, root=ws.root)
    check_fits(params.schedule, params.train.epochs, len(setup.train_loader))
    identity = resume_identity(setup)
    # rank 0 decides and sends its checkpoint to the other ranks (on other machines they have none)
    resume_state = dist.from_main(find_resume_state(params.train, config_id, ws.checkpoints,
                                                    _run_finished(params.mlflow.experiment, ws.root), identity=identity)
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
    mlflow = store.mlflow()
    experiment_id = store.configure(params.mlflow.experiment, ws.root)
    run_id = _reusable_run(resume_state.get("mlflow_run_id") if resume_state else None, experiment_id)
    active = runs.start_run(run_id, None if run_id else runs.run_name(f"train-{config_id[:6]}"),
                                system_metrics=params.mlflow.system_metrics)
    new_run = run_id is None
    run_id = active.info.run_id
    splits = ["train", "val"] if params.data.val_size > 0 else ["train"]
    found = runs.datasets(params.data, ws.root, splits, split_seed=SPLIT_SEED)
    logger = runs.RunLogger(run_id, datasets=found)  # train/* and val/* metrics name their dataset
    try:
        if resume_state is None or new_run:
            _start_run_record(params, setup, ws, config_id, max_lr, found)
        if resume_state is not None:
            mlflow.set_tag("resumed_from_epoch", str(resume_state["epoch"]))
            reconcile_metrics(params, max_lr, len(setup.train_loader), resume_state, logger)
        print(f"train: {params.model.name} (width {params.model.width}) on {setup.info.name}, {params.train.epochs} "
              f"epochs of {len(setup.train_loader)} steps, max_lr {max_lr:.3g}, device {device_name(setup.device)}, "
              f"{setup.precision}"
              f"{f' x {dist.world_size()} processes' if dist.world_size() > 1 else ''}; MLflow run {run_id}")
        hooks = stage_hooks(ws, config_id, run_id, logger, resume_state is not None, identity)
        with StopSignals() as stop:  # a finished checkpoint: fit trains nothing and returns its result
            result = fit(setup, max_lr, train=params.train, schedule=params.schedule, optimizer=params.optimizer,
                         hooks=hooks, resume_state=resume_state, should_stop=stop, progress=progress, step_fn=step_fn)
    except DivergenceError as exc:
        _finish_failed(params, setup, ws, run_id, str(exc), logger)
        raise
    except Interrupted as exc:
        logger.flush()
        runs.end_run_quietly("KILLED")
        raise Interrupted(f"{exc}; the state is in {ws.checkpoints / 'last.pt'}: {_how_to_resume(ws)}") from None
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


def _run_finished(experiment: str, root: Path) -> Callable[[str | None], bool]:
    """Whether an MLflow run ended FINISHED (a run the store cannot return counts as finished)."""
    def finished(run_id: str | None) -> bool:
        if not run_id:
            return True
        store.configure(experiment, root)
        try:
            return store.mlflow().MlflowClient().get_run(run_id).info.status == "FINISHED"
        except Exception:
            return True

    return finished


def in_dvc_temp_copy(ws: Workspace) -> bool:
    """Whether DVC runs us in a temporary copy it deletes afterwards (``dvc exp run --temp`` / ``--queue``)."""
    here = ws.root.resolve()
    if ".dvc" in here.parts:  # <workspace>/.dvc/tmp/exps/...
        return True
    env = os.environ.get("DVC_ROOT")
    return bool(env) and Path(env).resolve() != here and here == Path.cwd().resolve()


def _how_to_resume(ws: Workspace) -> str:
    if in_dvc_temp_copy(ws):
        return ("this experiment runs in a temporary copy that DVC deletes (`dvc exp run --temp/--queue`), so it "
                "cannot be resumed: run the experiment again to start it over, or use `dvc exp run` in the "
                "workspace to be able to resume")
    return "run `onecycle train` (or `dvc repro`) again to resume"


def _reusable_run(run_id: str | None, experiment_id: str | None) -> str | None:
    """The checkpoint's MLflow run if it can continue; None (a new run) when it was deleted or is gone.

    A run in another experiment than ``mlflow.experiment`` (changed since) continues in its own experiment.
    """
    if not run_id:
        return None
    mlflow = store.mlflow()
    client = mlflow.MlflowClient()
    try:
        info = client.get_run(run_id).info
    except Exception as exc:
        log.warning("the checkpoint's MLflow run %s is not in the store (%s): the training continues from the "
                    "checkpoint in a new run", run_id, one_line(exc)[:120])
        return None
    if info.lifecycle_stage == "deleted":
        log.warning("the checkpoint's MLflow run %s was deleted: the training continues from the checkpoint in a "
                    "new run (its epochs so far are logged to it)", run_id)
        return None
    if experiment_id is not None and info.experiment_id != experiment_id:
        exp = client.get_experiment(info.experiment_id)
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(info.experiment_id)
        log.warning("mlflow.experiment changed, but the run %s being resumed is in experiment %r: it continues "
                    "there (train.resume: false starts a new run)", run_id, exp.name)
        mlflow.set_experiment(experiment_id=info.experiment_id)
    return run_id


def reconcile_metrics(params, max_lr: float, steps_per_epoch: int, state: dict, logger: runs.RunLogger) -> None:
    """Log what the checkpoint holds but the run lacks (an epoch lost to a kill or MLflow being down at exit).

    Epoch rows come from the checkpoint's history; the per-step LR and momentum of its finished epochs are
    the schedule's (:func:`onecycle.training.schedule.lr_and_momentum_at`); the partial epoch's steps are
    logged when that epoch ends.
    """
    logged = logger.existing_steps("val/top1") | logger.existing_steps("train/loss")
    missing_rows = [row for row in state.get("history", []) if int(row["epoch"]) not in logged]
    for row in missing_rows:
        logger.log(row_metrics(row), step=int(row["epoch"]))
    done_steps = int(state["epoch"]) * steps_per_epoch
    missing_steps = sorted(set(range(done_steps)) - logger.existing_steps("lr"))
    momentum = OPTIMIZERS.lookup(params.optimizer.name).momentum(params.optimizer)
    for step in missing_steps:
        lr, m = lr_and_momentum_at(params.schedule, max_lr, params.train.epochs, steps_per_epoch, step, momentum)
        logger.log({"lr": lr, "momentum": m}, step=step)
    if missing_rows or missing_steps:
        log.warning("the MLflow run lacked %d epoch(s) and %d step(s) that %s holds: logged them now",
                    len(missing_rows), len(missing_steps), "the checkpoint")
    logger.flush()


def _start_run_record(params, setup: Setup, ws: Workspace, config_id: str, max_lr: float,
                      found: dict) -> None:
    """What a new training run records once: provenance tags, params, the LR finder's run and plot, the model."""
    from onecycle.training.models import model_summary

    mlflow = store.mlflow()
    mlflow.set_tags({**runs.provenance_tags(params.data.dataset, device_name(setup.device), ws.root),
                     "stage": "train", "config_hash": config_id, "processes": str(dist.world_size()),
                     "precision": setup.precision})
    mlflow.set_tags(runs.lr_report_provenance(ws.lr_find_json, lr_find_run_id(ws.lr_find_json)))
    if ws.lr_find_png.is_file():
        runs.log_artifact(ws.lr_find_png, "lr_find")
    runs.log_params_flat(runs.params_with_max_lr(params.flat(), max_lr))
    runs.log_datasets(found)
    sample = setup.train_loader.dataset[0][0]
    mlflow.log_text(model_summary(setup.net, (1, *sample.shape)), "model_summary.txt")


def _write_outputs(params, setup: Setup, ws: Workspace, state_dict: dict, summary: dict, run_id: str) -> None:
    """models/model.pt, reports/train.json (DVC metrics: numbers only) and reports/runs.json (the MLflow run ids
    of these outputs: the training's, and the LR range test's it used)."""
    save_model(params.model, params.augment, setup.info, state_dict, ws.model)
    atomic_write_text(ws.train_json, json.dumps(summary, indent=2) + "\n")
    lr_run = lr_find_run_id(ws.lr_find_json)
    run_ids = {"train": run_id, "lr_find": lr_run if runs.run_exists(lr_run) else None}  # ids that resolve here
    atomic_write_text(ws.runs_json, json.dumps(run_ids, indent=2) + "\n")


def finalize_steps(params, setup: Setup, ws: Workspace, result: FitResult, run_id: str,
                   logger: runs.RunLogger) -> list[tuple[str, Callable[[], object]]]:
    """The named steps after the last epoch, in order; each is safe to run again and recorded when done."""
    from onecycle.serving.network import log_network

    mlflow = store.mlflow()
    last = result.history[-1]
    summary = {"best_val_top1": result.best_top1 if result.best_top1 >= 0 else None, "best_epoch": result.best_epoch,
               "final_train_loss": last["train_loss"], "final_val_top1": last["val_top1"],
               "epochs": len(result.history), "total_seconds": round(result.seconds, 1)}

    def metrics() -> None:
        if not logger.flush(patient=True):  # waits out a server restart (MLflow's own retries)
            raise OneCycleError("MLflow is not reachable: the epochs' metrics could not be logged")
        mlflow.log_metrics({"val_best/top1": max(result.best_top1, 0.0), "val_best/epoch": result.best_epoch,
                            "total_seconds": result.seconds})

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

    def end_run() -> None:
        mlflow.end_run()

    return [("outputs", lambda: _write_outputs(params, setup, ws, result.best_state, summary, run_id)),
            ("metrics", metrics), ("checkpoints", checkpoints), ("reports", reports),
            ("network", lambda: log_network(setup, result.best_state, model=params.model, augment=params.augment)),
            ("end_run", end_run)]


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
        again = ("run the experiment again" if in_dvc_temp_copy(ws) else
                 "run `onecycle train` (or `dvc repro`) again to complete it without training again")
        msg = (f"the training finished but its finalization stopped at step '{name}' ({what}); the trained state is "
               f"in {ws.checkpoints / 'last.pt'}: {again} (MLflow run {run_id})")
        if in_dvc_temp_copy(ws):
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
    mlflow = store.mlflow()
    logger.flush()
    best = ws.checkpoints / "best.pt"
    if best.is_file():
        state = ckpt.load(best)
        _write_outputs(params, setup, ws, state["model"], {"diverged": True, "reason": reason,
                                                           "best_epoch": state.get("epoch")}, run_id)
    try:
        mlflow.set_tag("failure_reason", reason)
    except Exception as exc:
        log.warning("could not tag the MLflow run's failure (%s)", one_line(exc)[:200])
    runs.end_run_quietly("FAILED")


def _main(params, args) -> int:
    if params.train.nproc_per_node > 1 and not dist.launched():
        return _relaunch_under_torchrun(params, args)
    return run(params, Workspace())


def main(argv=None) -> int:
    return run_command("train", __doc__.splitlines()[0], argv, _main)


if __name__ == "__main__":
    raise SystemExit(main())
