"""Optuna plumbing for tune: the storage (journal file or RDB URL, or ``$OPTUNA_STORAGE``), the sampler, the
pruner (and whether it can prune at all), the study (its metric named, for the optuna CLI and dashboard).

The default storage is a journal file, safe for several worker processes on one machine; any RDB URL
(``sqlite:///...``, ``postgresql://...``) serves many machines. A password in a URL never appears in a
message (:func:`mask`).

Liveness: an RDB storage beats a heartbeat; a journal file has none, so each trial records its worker process
(:func:`worker_identity`) and the next worker on that machine fails the trials of a worker that is gone and
runs each once more (:func:`fail_dead_trials`).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import warnings
from pathlib import Path
from typing import Any

from onecycle.core.errors import ConfigError
from onecycle.core.redact import redact
from onecycle.core.values import storage_problem
from onecycle.training.schedule import peak_fraction
from onecycle.tuning import journal
from onecycle.tuning.space import Dimension

# Study user attrs.
METRIC_ATTR = "metric"
# Trial user attrs: the worker process that runs the trial (see worker_identity); why a trial failed.
WORKER_ATTR = "worker"
FAILURE_ATTR = "failure_reason"
# RDB storages: seconds between a running trial's heartbeats
HEARTBEAT_S = 60
# A trial whose worker died is run again this many times at most (as the RDB heartbeat's retry callback).
MAX_RETRY = 1


def mask(url: str) -> str:
    """``url`` with its password hidden (:func:`onecycle.redact.redact` decides how, everywhere)."""
    return redact(url)


STORAGE_ENV = "OPTUNA_STORAGE"  # the optuna CLI's variable: set, it overrides tune.storage here too


def storage_url(params) -> tuple[str | None, str]:
    """``(url, where it came from)``: ``$OPTUNA_STORAGE`` when set (so ``onecycle tune``, ``optuna trials`` and
    ``optuna-dashboard`` scripts can share one setting), else ``tune.storage`` (None = the default journal)."""
    env = os.environ.get(STORAGE_ENV, "").strip()
    if env:
        return env, STORAGE_ENV
    return params.tune.storage, "tune.storage"


def open_storage(url: str | None, default_journal: Path, key: str = "tune.storage"):
    """``(storage, description)``: the journal file (default, or a path) or an RDB URL.

    A storage that cannot be opened raises ConfigError naming ``key`` (a password in the URL is masked).
    """
    import optuna

    # optuna sets its logger to INFO when first imported: the tune stage prints each trial itself, in one line
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url is not None and (why := storage_problem(url)):  # empty, in memory: $OPTUNA_STORAGE too
        raise ConfigError(f"{key} {why}")
    if url is None or "://" not in url:
        path = default_journal if url is None else Path(url).expanduser()
        journal.check_file(path, key)  # a device, a folder, another file's content, a damaged journal: one line
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(journal.open_backend(path)), str(path)
        except Exception as exc:
            reason = " ".join(str(exc).split())
            raise ConfigError(f"{key}: cannot open the journal file {path}: {reason}") from None
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        db = url[len("sqlite:///"):]
        if db and db != ":memory:" and not os.path.isabs(db):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        # several workers on one SQLite file wait for each other's writes rather than fail at once
        engine_kwargs = {"connect_args": {"timeout": 60}}
    try:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        with _schema_lock(url, engine_kwargs), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # A worker that dies without a word (kill -9, a lost machine) stops beating: its trial is marked
            # FAIL after the grace period and run again once by another worker.
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                                 grace_period=2 * HEARTBEAT_S,
                                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ConfigError(f"{key}: cannot open {mask(url)}: {reason}") from None
    return storage, mask(url)


def repair_journal(params, default_journal: Path) -> str:
    """``onecycle tune --repair-journal``: mend the study's journal file (:func:`onecycle.tuning.journal.repair`)."""
    url, source = storage_url(params)
    if url is not None and "://" in url:
        raise ConfigError(f"--repair-journal mends a journal file, but {source} is {mask(url)}")
    path = default_journal if url is None else Path(url).expanduser()
    journal.check_file(path, source, damaged_ok=True)
    return journal.repair(path, source)


@contextlib.contextmanager
def study_deleted_is_one_line(params, default_journal: Path):
    """Optuna's ``KeyError: 'Record does not exist.'`` when the study was deleted while this worker ran (``optuna
    delete-study``, the dashboard) becomes one line; any other KeyError passes."""
    from onecycle.core.errors import OneCycleError

    try:
        yield
    except KeyError:
        url, source = storage_url(params)
        storage, where = open_storage(url, default_journal, key=source)
        try:
            storage.get_study_id_from_name(params.tune.study_name)
        except KeyError:
            raise OneCycleError(f"study {params.tune.study_name} was deleted from {where} while this worker ran "
                                "(optuna delete-study, the dashboard): its trials are gone; run `onecycle tune` "
                                "again to start it afresh") from None
        raise


# any fixed 64-bit key: all onecycle workers on one PostgreSQL server agree on it
_PG_LOCK_KEY = 0x6F6E656379636C65  # "onecycle"


@contextlib.contextmanager
def _schema_lock(url: str, engine_kwargs: dict[str, Any]):
    """Serialize Optuna's schema creation between workers that open one fresh database at once.

    ``RDBStorage()`` runs ``CREATE TYPE``/``CREATE TABLE`` and stamps the schema version; two processes
    doing that together on PostgreSQL or MySQL fail with "already exists" (DDL is not checked-and-created
    atomically). A server-side lock held around it (released when its connection closes, even if this
    process dies) lets one worker create the schema while the others wait, then find it. SQLite
    serializes writers by itself (the connect timeout above).
    """
    import sqlalchemy

    backend = url.split(":", 1)[0].split("+", 1)[0].lower()
    if backend not in ("postgresql", "postgres", "mysql", "mariadb"):
        yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                      connect_args=engine_kwargs.get("connect_args", {}))
    if backend.startswith("postgres"):
        lock, unlock = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"
    else:
        lock, unlock = "SELECT GET_LOCK('onecycle_optuna_schema', 600)", "SELECT RELEASE_LOCK('onecycle_optuna_schema')"
    args = {"k": _PG_LOCK_KEY} if backend.startswith("postgres") else {}
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(lock), args)
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text(unlock), args)
                conn.commit()
    finally:
        engine.dispose()


def _pid_namespace() -> str | None:
    """Linux: this process's PID namespace (``pid:[4026531836]``); containers may share a host name, not pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        return None


def worker_identity() -> dict[str, Any]:
    """This process, as a trial records it (user attr ``worker``): host name, pid, PID namespace, and the
    process's start time (seconds since the epoch), so that a pid the system has reused is not taken for it."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(),
            "started": psutil.Process().create_time()}


# psutil's start time on Linux is the boot time of /proc/stat plus the process's start in clock ticks, and that
# boot time can move by a second between reads. (A pid reused within 2 s would take pid_max new processes.)
_START_SLACK_S = 2.0


def worker_gone(worker: Any) -> bool:
    """Whether the process ``worker`` (a :func:`worker_identity`) is known to have ended: it ran on this machine
    (same host name and PID namespace) and its pid is not running, is a zombie, or is a later process.

    False when that cannot be told: no record, or another machine or container (a journal file serves one).
    """
    import psutil

    if not isinstance(worker, dict):
        return False
    here = worker_identity()
    if worker.get("host") != here["host"] or worker.get("pidns") != here["pidns"]:
        return False
    try:
        process = psutil.Process(int(worker["pid"]))
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        started = process.create_time()
        recorded = float(worker["started"])
    except psutil.NoSuchProcess:  # ZombieProcess included
        return True
    except (psutil.Error, KeyError, TypeError, ValueError):  # another user's process (alive), a bad record
        return False
    return abs(started - recorded) > _START_SLACK_S


def record_worker(trial) -> None:
    """Record this process as ``trial``'s worker (user attr ``worker``), for :func:`fail_dead_trials`."""
    trial.set_user_attr(WORKER_ATTR, worker_identity())


def running_elsewhere(trials) -> int:
    """How many of ``trials`` are RUNNING in a worker that is alive, or cannot be checked from here."""
    from optuna.trial import TrialState

    return sum(t.state == TrialState.RUNNING and not worker_gone(t.user_attrs.get(WORKER_ATTR)) for t in trials)


def fail_dead_trials(study) -> list[tuple[Any, str]]:
    """Mark FAIL each RUNNING trial of ``study`` whose worker is gone (:func:`worker_gone`: killed with -9, by
    the OOM killer, a crash) and queue a copy of it, at most :data:`MAX_RETRY` times per trial; that is what
    an RDB storage's heartbeat does (``optuna.storages.fail_stale_trials`` with
    ``RetryHeartbeatStaleTrialCallback(max_retry=1)``), which a journal file lacks.

    ``[(the failed trial, one line saying so)]``. A trial that another worker fails first is left to it.
    The copy is a WAITING trial with the same params (the next worker to ask runs it) and Optuna's system
    attrs ``failed_trial`` (the original trial's number) and ``retry_history``; none of the dead trial's user
    attrs (its MLflow run, its worker) carry over.
    """
    import optuna
    from optuna.trial import TrialState

    storage = study._storage  # as optuna.storages.fail_stale_trials does
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if not worker_gone(worker):
            continue
        reason = f"its worker (pid {worker['pid']} on {worker['host']}) ended without finishing it"
        try:
            storage.set_trial_user_attr(trial._trial_id, FAILURE_ATTR, reason)
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            continue
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if len(history) <= MAX_RETRY:
            system_attrs = {"failed_trial": trial.number, **trial.system_attrs, "retry_history": history}
            study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=trial.params,
                                                distributions=trial.distributions, system_attrs=system_attrs))
            again = "queued again with the same params"
        else:
            again = f"not queued again (it was already the retry of trial {history[0]})"
        failed.append((storage.get_trial(trial._trial_id), f"trial {trial.number} FAIL - {reason}; {again}"))
    return failed


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM and Ctrl-C stop the worker as KeyboardInterrupt, so a stopped worker leaves nothing RUNNING; yields the
    :class:`~onecycle.training.loop.StopSignals` that the trials poll.

    The first signal only requests the stop; the trial honours it at its next safe point (before it starts, before
    it trains, between two optimizer steps, after the study), so no MLflow write into an SQLite store is cut in half:
    one cut mid-transaction left the store locked for the run's own end ("database is locked"). Ctrl-C again raises
    KeyboardInterrupt at once. Optuna marks the running trial FAIL and the trial's MLflow run ends KILLED;
    killed by SIGTERM's default action instead, the trial would stay RUNNING in a journal file (which has no
    heartbeat) and its runs open, until the next worker on this machine found it (:func:`fail_dead_trials`).
    """
    from onecycle.training.loop import StopSignals

    with StopSignals(then="the study stops at the trial's next safe point") as stop:
        yield stop
        stop.check()  # a signal during the last trial's bookkeeping still ends the worker as interrupted


def build_sampler(params, seed: int):
    """TPE (multivariate, constant liar for parallel workers) or random, seeded."""
    import optuna

    if params.tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Random trials before TPE models the space: a third of the study, 3 to 10.
        startup = max(3, min(10, params.tune.n_trials // 3))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)


def trial_epochs(params, space: dict[str, Dimension]) -> int:
    """How many epochs the longest trial trains (the pruners' horizon)."""
    if "train.epochs" in space:
        return int(space["train.epochs"].upper)
    return params.tune.epochs


def build_pruner(params, space: dict[str, Dimension]):
    """``tune.pruner``. Steps are epochs (0-based). The median rule waits until the LR has peaked:
    ``n_warmup_steps = ceil(pct_start * epochs)`` with the largest pct_start the space allows, so the
    first epoch a trial can be pruned at is the first one wholly past the peak of its cycle. None prunes a
    multi-objective study (see :func:`pruner_cannot_prune`)."""
    import optuna

    kind = params.tune.pruner
    if kind == "none" or len(params.tune.metrics) > 1:
        return optuna.pruners.NopPruner()
    epochs = trial_epochs(params, space)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=median_warmup(params, space))


def median_warmup(params, space: dict[str, Dimension]) -> int:
    """The median pruner's ``n_warmup_steps``: the epochs until the LR has peaked, at the largest pct_start."""
    epochs = trial_epochs(params, space)
    searched = space["schedule.pct_start"].upper if "schedule.pct_start" in space else None
    return math.ceil(peak_fraction(params.schedule, epochs, searched) * epochs)


def pruner_cannot_prune(params, space: dict[str, Dimension]) -> str | None:
    """Why ``tune.pruner`` can never stop a trial: a multi-objective study, or too few epochs (None when it can).

    A trial is only pruned after an epoch that is not its last (the last one completes it). The median rule
    also waits ``n_warmup_steps`` epochs (see :func:`build_pruner`); hyperband needs 2 epochs or more.
    """
    kind = params.tune.pruner
    if kind == "none":
        return None
    if len(params.tune.metrics) > 1:
        return (f"pruning is off: Optuna's pruners judge one objective and tune.metric has "
                f"{len(params.tune.metrics)} ({', '.join(params.tune.metrics)}); every trial runs to its end "
                f"(tune.pruner: none says so)")
    epochs = trial_epochs(params, space)
    if kind == "hyperband":
        if epochs >= 2:
            return None
        return (f"tune.pruner hyperband cannot stop any trial: trials train {epochs} epoch, and a trial is only "
                "stopped after an epoch that is not its last. Use tune.epochs >= 2, or tune.pruner: none")
    warmup = median_warmup(params, space)  # 0-based epochs the median rule waits
    if warmup <= epochs - 2:
        return None
    return (f"tune.pruner median cannot stop any trial: trials train {epochs} epoch{'s' if epochs != 1 else ''} and "
            f"the median rule judges a trial only after {warmup} epoch{'s' if warmup != 1 else ''} (when the LR has "
            "peaked, at the largest pct_start searched) and never after the last one, which always completes. "
            f"Use tune.epochs >= {warmup + 2} for pruning, or tune.pruner: none to say so")


def open_study(storage, params):
    """``(study, created)``: the study ``tune.study_name`` in ``storage``, created if absent, with one objective per
    ``tune.metric`` (several: a multi-objective study), each named for the ``optuna`` CLI and the dashboard.

    The sampler is seeded with ``tune.seed`` in the process that creates the study (a fresh single-worker
    study is reproducible); a process that joins or resumes it mixes in the trial count and its pid, so that
    workers and resumed runs never replay the same random trials.
    """
    import numpy as np
    import optuna

    tune = params.tune
    metrics, directions = tune.metrics, tune.directions
    try:
        optuna.create_study(storage=storage, study_name=tune.study_name, directions=directions)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    study = optuna.load_study(study_name=tune.study_name, storage=storage)
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:
        raise ConfigError(f"tune.direction is {_one_or_list(directions)} but study {tune.study_name} was created to "
                          f"{_one_or_list(stored)}; use another tune.study_name")
    metric = study.user_attrs.get(METRIC_ATTR)
    if metric is None:
        study.set_user_attr(METRIC_ATTR, tune.metric)
    elif (metric if isinstance(metric, list) else [metric]) != metrics:
        raise ConfigError(f"tune.metric is {_one_or_list(metrics)} but study {tune.study_name} optimizes "
                          f"{_one_or_list(metric)}; use another tune.study_name")
    if study.metric_names is None:  # `optuna trials`, the dashboard and trials.csv name the values, not "value"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metrics)
    n_before = len(study.get_trials(deepcopy=False))
    seed = tune.seed
    if not created:
        seed = int(np.random.SeedSequence([tune.seed, n_before, os.getpid()]).generate_state(1)[0])
    study.sampler = build_sampler(params, seed)
    return study, created


def _one_or_list(value) -> str:
    """``maximize`` or ``[maximize, minimize]``, as params.yaml spells one value or a list."""
    if isinstance(value, list) and len(value) != 1:
        return "[" + ", ".join(value) + "]"
    return value[0] if isinstance(value, list) else str(value)
