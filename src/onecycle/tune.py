"""tune stage: an Optuna study over the One Cycle schedule, each trial a real (shortened) training.

A trial is ``params`` with the sampled values applied and ``train.epochs = tune.epochs`` (unless
``train.epochs`` is itself in the search space), trained by :func:`onecycle.train.fit` on the same
:func:`onecycle.engine.build_setup` as ``onecycle train``, without checkpoints. Its value is the best
per-epoch ``tune.metric`` on the validation split (in ``tune.direction``), the same model selection
``train`` uses; the test split is never touched. Every epoch's value is reported to Optuna, and the
pruner may stop the trial (``PRUNED``); a trial whose loss diverges is recorded as ``PRUNED`` too, with
the reason in its user attrs, and the study goes on.

The study lives in ``tune.storage``: by default the journal file ``reports/tune/study.journal``, safe
for several worker processes on one machine; any Optuna RDB URL (``sqlite:///...``,
``postgresql://...``) for many machines. Re-running resumes the study (``--n-trials`` counts the trials
of this process). MLflow gets one parent run per study (its id is a study user attr, so a resumed
study and every worker log under the same parent) and one nested run per trial.
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import time
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cli import run_command
from .data import atomic_write_text
from .errors import ConfigError, OneCycleError
from .files import save_figure

log = logging.getLogger(__name__)

TUNE_DIR = Path("reports/tune")
JOURNAL = TUNE_DIR / "study.journal"
BEST_PARAMS = TUNE_DIR / "best_params.yaml"
TRIALS_CSV = TUNE_DIR / "trials.csv"
# Study user attrs.
PARENT_RUN_ATTR = "mlflow_parent_run_id"
METRIC_ATTR = "metric"

# Sections whose keys a search space may draw from.
TUNABLE_SECTIONS = ("schedule", "optimizer", "model", "train", "data")
# Keys that stay fixed: they change the data the metric is measured on.
_FIXED = {"data.dataset", "data.source", "data.root", "data.val_size"}
_SPEC_FIELDS = ("low", "high", "log", "type", "choices")


class _InvalidTrialError(ConfigError):
    """The sampled values do not make a valid configuration together (the trial is FAIL, the study goes on)."""


# ----------------------------------------------------------------------------------------- the space

@dataclass(frozen=True)
class Dimension:
    """One searched key: a float or int range (optionally log-scaled) or a list of choices."""

    key: str  # dotted params key, also the Optuna parameter name
    kind: str = "float"  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)

    @property
    def upper(self) -> float:
        """The largest value this dimension can take (numeric choices only)."""
        return float(self.high if self.kind != "categorical" else max(self.choices))

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key} in {list(self.choices)}"
        return f"{self.key} {'log ' if self.log else ''}{self.kind} [{self.low:g}, {self.high:g}]"


DEFAULT_KEYS = ("schedule.max_lr", "schedule.pct_start", "schedule.div_factor")


def default_space(params, suggestion: Callable[[], float] | None = None) -> dict[str, dict[str, Any]]:
    """The space searched when ``tune.space`` is empty, as specs.

    ``schedule.max_lr``: log-uniform over one decade either side of ``schedule.max_lr`` when it is a number,
    else of the LR finder's chosen suggestion (``suggestion()``, by default read from reports/lr_find.json);
    ``schedule.pct_start``: uniform 0.1..0.5 (left out while ``schedule.peak_epoch`` is set, which overrides
    it); ``schedule.div_factor``: log-uniform 5..100.
    """
    keys = [k for k in DEFAULT_KEYS if not (k == "schedule.pct_start" and params.schedule.peak_epoch is not None)]
    return {key: _default_spec(params, key, suggestion) for key in keys}


def _default_spec(params, key: str, suggestion: Callable[[], float] | None) -> dict[str, Any]:
    if key == "schedule.max_lr":
        centre = params.schedule.max_lr
        if centre == "auto":
            if suggestion is None:
                from .lr_find import read_suggestion as suggestion
            centre = suggestion()
        return {"low": centre / 10, "high": centre * 10, "log": True}
    if key == "schedule.pct_start":
        return {"low": 0.1, "high": 0.5}
    return {"low": 5.0, "high": 100.0, "log": True}


def search_space(params, suggestion: Callable[[], float] | None = None) -> dict[str, Dimension]:
    """The validated search space: the defaults, with ``tune.space`` entries giving (some of) their bounds
    (a default key keeps its scale unless the entry sets ``log``), adding keys, or removing a default key
    (``null``).

    A wrong entry raises :class:`ConfigError` naming ``tune.space.<key>``. The LR finder's suggestion is read
    only when the default ``schedule.max_lr`` range is needed.
    """
    user = _flatten_space(params.tune.space)
    specs: dict[str, Any] = {}
    for key in DEFAULT_KEYS:
        given = user.get(key)
        if key in user and given is None:
            continue  # removed by the user
        if key == "schedule.pct_start" and params.schedule.peak_epoch is not None and key not in user:
            continue  # peak_epoch overrides pct_start
        if key in user and not isinstance(given, dict):
            specs[key] = given  # wrong: _dimension says why
        elif key in user and _complete(given):
            # bounds given in full: the default's scale stays unless the entry says otherwise
            specs[key] = given if "choices" in given else {"log": key != "schedule.pct_start", **given}
        else:
            specs[key] = {**_default_spec(params, key, suggestion), **(given or {})}
    for key, spec in user.items():
        if key in DEFAULT_KEYS:
            continue
        if spec is None:
            raise ConfigError(f"tune.space.{key}: null removes a default key ({', '.join(DEFAULT_KEYS)}); "
                              f"{key} is not one")
        specs[key] = spec
    if not specs:
        raise ConfigError("tune.space leaves nothing to search: give at least one key")
    return {key: _dimension(params, key, spec) for key, spec in specs.items()}


def _complete(spec: dict) -> bool:
    return "choices" in spec or ("low" in spec and "high" in spec)


def _flatten_space(space: dict[str, Any]) -> dict[str, Any]:
    """Accept ``{"schedule.max_lr": spec}`` and the nested ``{"schedule": {"max_lr": spec}}``."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        key = str(key)
        if "." not in key and key in TUNABLE_SECTIONS and isinstance(value, dict):
            for field, spec in value.items():
                out[f"{key}.{field}"] = spec
        else:
            out[key] = value
    return out


def _section_model(section: str):
    from .config import Params

    field = Params.model_fields.get(section)
    return field.annotation if field is not None else None


def _is_int_field(annotation: Any) -> bool:
    if annotation is int:
        return True
    args = typing.get_args(annotation)
    return int in args and float not in args


def _number(value: Any, where: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    return value


def _check_value(params, key: str, value: Any, where: str) -> None:
    section, field = key.split(".", 1)
    try:
        params.replace(**{section: {field: value}})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {value!r} is not a valid {key} ({exc})") from None


def _dimension(params, key: str, spec: Any) -> Dimension:
    where = f"tune.space.{key}"
    section, _, field = key.partition(".")
    model = _section_model(section) if section in TUNABLE_SECTIONS else None
    if model is None or field not in model.model_fields:
        raise ConfigError(f"{where}: unknown key (a search space takes keys of the sections "
                          f"{', '.join(TUNABLE_SECTIONS)}, e.g. schedule.max_lr)")
    if key in _FIXED:
        raise ConfigError(f"{where}: cannot be tuned: it changes the validation split the metric is measured on")
    if key == "schedule.pct_start" and params.schedule.peak_epoch is not None:
        raise ConfigError(f"{where}: has no effect while schedule.peak_epoch is set (it overrides pct_start)")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping like {{low: 0.01, high: 1, log: true}} or "
                          f"{{choices: [...]}}, got {spec!r}")
    unknown = sorted(set(spec) - set(_SPEC_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]} (allowed: {', '.join(_SPEC_FIELDS)})")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise ConfigError(f"{where}: choices cannot be combined with low, high, log or type")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices must be a non-empty list, got {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, bool | int | float | str):
                raise ConfigError(f"{where}.choices: each choice must be a number, string, bool or null, got {c!r}")
            _check_value(params, key, c, f"{where}.choices")
        return Dimension(key, "categorical", choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: needs low and high (or choices)")
    low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
    kind = spec.get("type", "int" if _is_int_field(model.model_fields[field].annotation) else "float")
    if kind not in ("float", "int"):
        raise ConfigError(f"{where}.type must be one of 'float', 'int'; got {kind!r}")
    use_log = spec.get("log", False)
    if not isinstance(use_log, bool):
        raise ConfigError(f"{where}.log must be true or false, got {use_log!r}")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: type int needs whole-number bounds, got low={low:g}, high={high:g}")
    if low >= high:
        raise ConfigError(f"{where}: low must be below high, got low={low:g}, high={high:g}")
    if use_log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got low={low:g}")
    if kind == "int":
        low, high = int(low), int(high)
    _check_value(params, key, low, f"{where}.low")
    _check_value(params, key, high, f"{where}.high")
    return Dimension(key, kind, low=low, high=high, log=use_log)


def trial_params(params, values: dict[str, Any]):
    """``params`` with the sampled ``values`` applied and ``train.epochs = tune.epochs`` (unless sampled)."""
    sections: dict[str, dict[str, Any]] = {"train": {"epochs": params.tune.epochs}}
    for key, value in values.items():
        section, field = key.split(".", 1)
        sections.setdefault(section, {})[field] = value
    return params.replace(**sections)


def metric_column(params) -> str:
    """The history row key (``val_top1``) of ``tune.metric`` (``val/top1``); ConfigError naming tune.metric."""
    from .train import METRIC_KEYS

    by_name = {name: column for column, name in METRIC_KEYS.items()}
    metric = params.tune.metric
    column = by_name.get(metric) or (metric if metric in METRIC_KEYS else None)
    if column is None:
        raise ConfigError(f"tune.metric must be one of {', '.join(by_name)}; got {metric!r}")
    if column.startswith("val_") and params.data.val_size == 0:
        raise ConfigError(f"tune.metric {metric} needs a validation split, but data.val_size is 0")
    if "loss" in column and params.tune.direction == "maximize":
        log.warning("tune.metric is %s and tune.direction is maximize: the study looks for the highest loss", metric)
    return column


# ------------------------------------------------------------------------------- storage, sampler, pruner

def _mask(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str | None):
    """``(storage, description)``: the journal file (default, or a path) or an RDB URL.

    A storage that cannot be opened raises ConfigError naming tune.storage (a password in the URL is masked).
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url is None or "://" not in url:
        path = JOURNAL if url is None else Path(url).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The open(O_EXCL) lock: works on Linux, macOS and Windows (the symlink lock needs a privilege there)
            # and on NFSv3+; it shares the lock file with optuna-dashboard's.
            backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
            return optuna.storages.JournalStorage(backend), str(path)
        except Exception as exc:
            reason = " ".join(str(exc).split())
            raise ConfigError(f"tune.storage: cannot open the journal file {path}: {reason}") from None
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        db = url[len("sqlite:///"):]
        if db and db != ":memory:" and not os.path.isabs(db):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        # several workers on one SQLite file wait for each other's writes rather than fail at once
        engine_kwargs = {"connect_args": {"timeout": 60}}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ConfigError(f"tune.storage: cannot open {_mask(url)}: {reason}") from None
    return storage, _mask(url)


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
    first epoch a trial can be pruned at is the first one wholly past the peak of its cycle."""
    import optuna

    kind = params.tune.pruner
    if kind == "none":
        return optuna.pruners.NopPruner()
    epochs = trial_epochs(params, space)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    if "schedule.pct_start" in space:
        pct = space["schedule.pct_start"].upper
    elif params.schedule.peak_epoch is not None:
        pct = min(params.schedule.peak_epoch / epochs, 1.0)
    else:
        pct = params.schedule.pct_start
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=math.ceil(pct * epochs))


def open_study(storage, params):
    """``(study, created)``: the study ``tune.study_name`` in ``storage``, created if absent.

    The sampler is seeded with ``tune.seed`` in the process that creates the study (a fresh single-worker
    study is reproducible); a process that joins or resumes it mixes in the trial count and its pid, so that
    workers and resumed runs never replay the same random trials.
    """
    import numpy as np
    import optuna

    tune = params.tune
    try:
        optuna.create_study(storage=storage, study_name=tune.study_name, direction=tune.direction)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    study = optuna.load_study(study_name=tune.study_name, storage=storage)
    if len(study.directions) != 1:
        raise ConfigError(f"tune.study_name: study {tune.study_name} has several objectives; use another name")
    stored = study.direction.name.lower()
    if stored != tune.direction:
        raise ConfigError(f"tune.direction is {tune.direction} but study {tune.study_name} was created to {stored}; "
                          "use another tune.study_name")
    metric = study.user_attrs.get(METRIC_ATTR)
    if metric is None:
        study.set_user_attr(METRIC_ATTR, tune.metric)
    elif metric != tune.metric:
        raise ConfigError(f"tune.metric is {tune.metric} but study {tune.study_name} optimizes {metric}; "
                          "use another tune.study_name")
    n_before = len(study.get_trials(deepcopy=False))
    seed = tune.seed
    if not created:
        seed = int(np.random.SeedSequence([tune.seed, n_before, os.getpid()]).generate_state(1)[0])
    study.sampler = build_sampler(params, seed)
    return study, created


# ------------------------------------------------------------------------------------------- MLflow

def parent_run(study, created: bool, experiment_id: str, tags: dict[str, str],
               wait_s: float = 30.0) -> tuple[str, bool]:
    """``(run_id, new)``: the study's MLflow parent run, created and recorded in the study if it has none.

    A worker that joins a study another worker has just created waits (up to ``wait_s``) for that worker
    to record its parent run, so that both log under one parent.
    """
    import mlflow

    client = mlflow.MlflowClient()
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    deadline = time.monotonic() + (0 if created else wait_s)
    while run_id is None and time.monotonic() < deadline:
        time.sleep(0.5)
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id is not None:
        try:
            info = client.get_run(run_id).info
            if info.lifecycle_stage == "active" and info.experiment_id == experiment_id:
                return run_id, False
        except Exception:  # not in this tracking store (MLFLOW_TRACKING_URI changed)
            pass
        log.warning("the study's MLflow parent run %s is not in this tracking store and experiment (or was "
                    "deleted); starting a new one", run_id)
    run = client.create_run(experiment_id, run_name=study.study_name, tags=tags)
    study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
    return run.info.run_id, True


def _quietly(what: str, fn: Callable[[], Any]) -> None:
    """MLflow calls whose failure must not end a study (the store may be locked by another worker)."""
    try:
        fn()
    except Exception as exc:
        log.warning("MLflow: could not %s (%s)", what, " ".join(str(exc).split())[:160])


class Objective:
    """One trial: sample, build the trial's params, train with ``fit``, report each epoch, log a nested run."""

    def __init__(self, params, space: dict[str, Dimension], column: str, tags: dict[str, str]):
        self.params, self.space, self.column, self.tags = params, space, column, tags
        self.metric = params.tune.metric
        self.maximize = params.tune.direction == "maximize"

    def __call__(self, trial) -> float:
        import mlflow
        import optuna

        from .engine import DivergenceError, build_setup
        from .tracking import log_params_flat
        from .train import RunLogger, config_hash, fit, resolve_max_lr

        values = {key: dim.suggest(trial) for key, dim in self.space.items()}
        run = mlflow.start_run(nested=True, run_name=f"trial-{trial.number}")
        run_id = run.info.run_id
        logger = RunLogger(run_id)
        state, status = "FAIL", "FAILED"
        try:
            trial.set_user_attr("mlflow_run_id", run_id)
            mlflow.set_tags({**self.tags, "stage": "tune_trial", "trial_number": str(trial.number), "state": "RUNNING"})
            try:
                tparams = trial_params(self.params, values)
            except ConfigError as exc:
                msg = f"trial {trial.number}: the sampled values do not fit together: {exc}"
                raise _InvalidTrialError(msg) from None
            max_lr = resolve_max_lr(tparams)
            log_params_flat({**tparams.flat(), "schedule.max_lr_used": max_lr})
            mlflow.set_tag("config_hash", config_hash(tparams, max_lr))
            setup = build_setup(tparams)
            result = fit(tparams, setup, max_lr, logger=logger, checkpoint_dir=None,
                         on_epoch=self._pruning_hook(trial, tparams.train.epochs))
            seen = [row[self.column] for row in result.history
                    if row.get(self.column) is not None and math.isfinite(row[self.column])]
            if not seen:
                raise _InvalidTrialError(f"trial {trial.number}: no finite {self.metric} to report")
            value = float(max(seen) if self.maximize else min(seen))
            mlflow.log_metric("objective", value)
            state, status = "COMPLETE", "FINISHED"
            return value
        except optuna.TrialPruned:
            state, status = "PRUNED", "FINISHED"
            raise
        except DivergenceError as exc:
            state = "PRUNED"  # the run stays FAILED, as a diverged training does
            reason = str(exc)
            trial.set_user_attr("diverged", reason)
            _quietly("tag the failure", lambda: mlflow.set_tag("failure_reason", reason))
            raise optuna.TrialPruned(f"diverged: {reason}") from None
        except _InvalidTrialError as exc:
            reason = str(exc)
            trial.set_user_attr("failure_reason", reason)
            _quietly("tag the failure", lambda: mlflow.set_tag("failure_reason", reason))
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            logger.flush()
            _quietly("tag the trial's state", lambda: mlflow.set_tag("state", state))
            mlflow.end_run(status=status)

    def _pruning_hook(self, trial, epochs: int) -> Callable[[int, dict], None]:
        import optuna

        def on_epoch(epoch: int, row: dict) -> None:
            value = row.get(self.column)
            if value is None or not math.isfinite(value):
                return
            trial.report(float(value), epoch)
            # After the last epoch the trial is done: it completes rather than being pruned.
            if epoch + 1 < epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: {self.metric} {value:.4f}")

        return on_epoch


def _after_trial(metric: str):
    def callback(study, trial) -> None:
        import mlflow
        from optuna.trial import TrialState

        value = f" {metric} {trial.value:.4f}" if trial.state == TrialState.COMPLETE else ""
        reason = trial.user_attrs.get("diverged") or trial.user_attrs.get("failure_reason")
        shown = ", ".join(f"{k.split('.', 1)[1]} {_fmt(v)}" for k, v in trial.params.items())
        best = _best_trial(study)
        best_txt = f"; best: trial {best.number} ({best.value:.4f})" if best is not None else ""
        print(f"tune: trial {trial.number} {trial.state.name}{value} ({shown}){' - ' + reason if reason else ''}"
              f"{best_txt}", flush=True)
        if trial.state == TrialState.COMPLETE:
            _quietly("log the trial's value", lambda: mlflow.log_metric("trial/value", trial.value, step=trial.number))

    return callback


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _best_trial(study):
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


# ------------------------------------------------------------------------------------------ outputs

def _rounded(value: Any) -> Any:
    """Best values to 4 significant digits: more is noise, and they are pasted into params.yaml."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def best_values(params, trial) -> dict[str, Any]:
    """The best trial's sampled values (dotted keys), rounded where that keeps them valid."""
    exact = dict(trial.params)
    rounded = {k: _rounded(v) for k, v in exact.items()}
    try:
        trial_params(params, rounded)
        return rounded
    except ConfigError:
        return exact


def best_params_text(params, values: dict[str, Any], study, metric: str) -> str:
    """reports/tune/best_params.yaml: the schedule section (and every other tuned section), whole, with the
    best values applied, ready to paste into params.yaml."""
    import yaml

    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, field = key.split(".", 1)
        sections.setdefault(section, {})[field] = value
    best = params.replace(**sections)
    out = {"schedule": best.schedule.model_dump(mode="json")}
    for section in sorted(set(sections) - {"schedule"}):
        out[section] = getattr(best, section).model_dump(mode="json")
    trial = study.best_trial
    n_complete = sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))
    epochs = "" if "train.epochs" in values else f" after {_count(params.tune.epochs, 'epoch')}"
    header = (f"# Best of Optuna study {study.study_name}: trial {trial.number}, {metric} {trial.value:.4f}{epochs} "
              f"(best of {_count(n_complete, 'complete trial')}).\n"
              f"# Tuned keys: {', '.join(values)}. Paste over these sections of params.yaml,\n"
              "# or run `onecycle tune --n-trials 0 --apply` to write just the tuned keys into it.\n")
    return header + yaml.safe_dump(out, sort_keys=False)


def write_plots(study, metric: str, out: Path = TUNE_DIR) -> list[Path]:
    """PNGs of the study: optimization history, intermediate values, parameter importances (>= 2 complete
    trials with > 1 parameter varied), and a contour (>= 3 complete trials) or slice of max_lr vs pct_start.

    A plot that cannot be drawn yet (too few trials) is skipped with a warning; it never stops the study.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    varied = sorted({k for t in complete for k in t.params
                     if len({repr(u.params.get(k)) for u in complete}) > 1})
    pair = [k for k in ("schedule.max_lr", "schedule.pct_start") if any(k in t.params for t in complete)]
    jobs: list[tuple[str, Callable[[], Any]]] = []
    if complete:
        jobs.append(("optimization_history", lambda: ovm.plot_optimization_history(study, target_name=metric)))
    if any(t.intermediate_values for t in trials):
        jobs.append(("intermediate_values", lambda: ovm.plot_intermediate_values(study)))
    if len(complete) >= 2 and len(varied) > 1:
        jobs.append(("param_importances", lambda: ovm.plot_param_importances(study, target_name=metric)))
    if len(pair) == 2 and len(complete) >= 3 and set(pair) <= set(varied):
        jobs.append(("contour_max_lr_pct_start", lambda: ovm.plot_contour(study, params=pair, target_name=metric)))
    elif pair and complete:
        jobs.append(("slice_max_lr_pct_start", lambda: ovm.plot_slice(study, params=pair, target_name=metric)))
    written = []
    for name, draw in jobs:
        # Optuna's plots switch matplotlib's style for the whole process; keep that inside this plot.
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fig = np.ravel(draw())[0].figure
            except Exception as exc:
                log.warning("tune: skipped the %s plot (%s)", name, " ".join(str(exc).split())[:160])
                plt.close("all")
                continue
            path = out / f"{name}.png"
            save_figure(fig, path, dpi=110, bbox_inches="tight")
        written.append(path)
    return written


def _yaml_rt(text: str):
    """A ruamel round-trip YAML that keeps ``text``'s indentation and writes values PyYAML reads back alike."""
    import yaml as pyyaml
    from ruamel.yaml import YAML
    from ruamel.yaml.util import load_yaml_guess_indent

    _, indent, block_seq_indent = load_yaml_guess_indent(text)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=indent or 2, sequence=indent or 2, offset=block_seq_indent or 0)
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    # PyYAML's form (1.0e-05, not 1e-05, which YAML 1.1 and so load_params would read as a string)
    rt.representer.add_representer(float, lambda r, v: r.represent_scalar(
        "tag:yaml.org,2002:float", pyyaml.safe_dump(v).splitlines()[0]))
    return rt


def apply_best(path: Path, values: dict[str, Any]) -> list[str]:
    """Write ``values`` (dotted keys) into the params file at ``path``, changing only those keys and keeping
    comments, order and formatting; atomically, and only if the result loads with the same values."""
    import yaml as pyyaml

    from .config import parse_params

    text = path.read_text()
    rt = _yaml_rt(text)
    doc = rt.load(text)
    if doc is None:
        from ruamel.yaml.comments import CommentedMap

        doc = CommentedMap()
    changed = []
    for key, value in values.items():
        section, field = key.split(".", 1)
        if doc.get(section) is None:
            from ruamel.yaml.comments import CommentedMap

            doc[section] = CommentedMap()
        old = doc[section].get(field)
        if old != value or field not in doc[section]:
            doc[section][field] = value
            changed.append(f"{key}: {old} -> {value}")
    buf = io.StringIO()
    rt.dump(doc, buf)
    new_text = buf.getvalue()
    reread = parse_params(pyyaml.safe_load(new_text)).flat()
    wrong = [k for k, v in values.items() if reread.get(k) != v]
    if wrong:
        raise OneCycleError(f"--apply: {path} would not read back {wrong[0]} = {values[wrong[0]]!r}; not written")
    if changed:
        atomic_write_text(path, new_text, mode=stat.S_IMODE(path.stat().st_mode))  # params.yaml keeps its mode
    return changed


# ------------------------------------------------------------------------------------------- the stage

def _add_args(parser) -> None:
    def non_negative(v: str) -> int:
        n = int(v)
        if n < 0:
            raise ValueError(v)
        return n

    def positive(v: str) -> float:
        x = float(v)
        if not x > 0:
            raise ValueError(v)
        return x

    parser.add_argument("--n-trials", type=non_negative, default=None, metavar="N",
                        help="trials to run in this process (default: tune.n_trials; 0 = only write the reports)")
    parser.add_argument("--timeout", type=positive, default=None, metavar="S",
                        help="start no new trial after S seconds (the running one finishes)")
    parser.add_argument("--threads", type=non_negative, default=None, metavar="N",
                        help="torch threads of this worker (overrides train.threads; see README: Tuning)")
    parser.add_argument("--apply", action="store_true",
                        help="write the best trial's values into the params file (only those keys; comments kept)")


def _run(params, args) -> int:
    import mlflow
    from optuna.trial import TrialState

    from .engine import device_name, resolve_device
    from .tracking import configure, log_params_flat, provenance_tags, quiet_mlflow

    logging.getLogger("optuna").setLevel(logging.WARNING)
    tune = params.tune
    if args.threads is not None:
        params = params.replace(train={"threads": args.threads})
    n_trials = tune.n_trials if args.n_trials is None else args.n_trials
    column = metric_column(params)
    space = search_space(params)
    try:
        trial_params(params, {})
    except ConfigError as exc:
        raise ConfigError(f"tune.epochs ({tune.epochs}) does not fit the other params: {exc}") from None
    storage, where = open_storage(tune.storage)
    quiet_mlflow()
    experiment_id = configure(params.mlflow.experiment)
    study, created = open_study(storage, params)
    study.pruner = build_pruner(params, space)
    tags = {**provenance_tags(params.data.dataset, device_name(resolve_device(params.train.device))),
            "optuna_study": tune.study_name, "optuna_storage": where}
    parent_id, new_parent = parent_run(study, created, experiment_id, {**tags, "stage": "tune"})
    before = study.get_trials(deepcopy=False)
    running = sum(t.state == TrialState.RUNNING for t in before)
    if running and params.train.threads == 0:
        log.warning("%d trial(s) of this study are running in other workers: give each worker its share of the "
                    "cores (--threads N or train.threads; see README: Tuning)", running)
    print(f"tune: study {tune.study_name} in {where} ({_count(len(before), 'trial')} so far); "
          f"{_count(n_trials, 'trial')} of {_count(tune.epochs, 'epoch')} here, {tune.sampler} sampler, "
          f"{tune.pruner} pruner, {tune.direction} {tune.metric}; "
          f"space: {'; '.join(d.describe() for d in space.values())}; MLflow parent run {parent_id}", flush=True)
    with mlflow.start_run(run_id=parent_id):
        if new_parent:
            _quietly("log the study's params", lambda: log_params_flat(params.flat()))
        if n_trials:
            study.optimize(Objective(params, space, column, tags), n_trials=n_trials, timeout=args.timeout,
                           catch=(_InvalidTrialError,), callbacks=[_after_trial(tune.metric)], gc_after_trial=True)
        values = _report(study, params, where)
    if args.apply:
        if values is None:
            raise OneCycleError(f"--apply: study {tune.study_name} has no complete trial yet")
        changed = apply_best(Path(args.params), values)
        print(f"tune: --apply wrote {len(changed)} key(s) into {args.params}"
              + (": " + "; ".join(changed) if changed else " (already the best values)"))
    return 0


def _report(study, params, where: str) -> dict[str, Any] | None:
    """Write reports/tune/ (trials.csv, plots, best_params.yaml) and the parent run's summary; the best values."""
    import mlflow

    metric = params.tune.metric
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    TUNE_DIR.mkdir(parents=True, exist_ok=True)
    if trials:
        atomic_write_text(TRIALS_CSV, study.trials_dataframe().to_csv(index=False))
    plots = write_plots(study, metric)
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    best = _best_trial(study)
    if best is None:
        print(f"tune: study {study.study_name} in {where}: {len(trials)} trials ({summary or 'none'}); "
              f"no complete trial yet, so no {BEST_PARAMS}")
        return None
    values = best_values(params, best)
    atomic_write_text(BEST_PARAMS, best_params_text(params, values, study, metric))

    def log_summary() -> None:
        mlflow.log_metric("best/value", best.value, step=len(trials))
        mlflow.set_tags({"best_trial": str(best.number), "best_value": f"{best.value:.6g}",
                         "best_mlflow_run_id": best.user_attrs.get("mlflow_run_id", ""),
                         **{f"best.{k}": str(v) for k, v in values.items()}})
        mlflow.log_dict({"trial": best.number, "value": best.value, "params": values}, "tune/best.json")
        for path in (BEST_PARAMS, TRIALS_CSV, *plots):
            mlflow.log_artifact(str(path), artifact_path="tune")

    _quietly("log the study's summary", log_summary)
    shown = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items())
    print(f"tune: study {study.study_name} in {where}: {len(trials)} trials ({summary}); best trial {best.number}: "
          f"{metric} {best.value:.4f} with {shown} -> {BEST_PARAMS}, {len(plots)} plots in {TUNE_DIR}/")
    return values


def main(argv=None) -> int:
    return run_command("tune", __doc__.splitlines()[0], argv, _run, add_args=_add_args)


if __name__ == "__main__":
    raise SystemExit(main())
