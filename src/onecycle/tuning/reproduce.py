"""What makes a trial reproducible and a study's trials comparable: the ``dvc exp run -S ...`` command that re-runs
a trial from the repository (every key where the trial's params differ from the repo's ``params.yaml``, not only
the sampled ones: a worker may run with its own ``--params`` file), and the params a study holds fixed (what
every trial shares), recorded in the study so that a worker with other fixed params does not join it silently.
The study's user attrs hold only their digest (``optuna studies`` prints user attrs in its table); the record
itself is a system attr of the study, read back to name the keys that differ.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from typing import Any

from onecycle.core.errors import ConfigError
from onecycle.training.loop import NEUTRAL_KEYS

# Study user attr: a digest of the params every trial of the study shares; the study's system attr of the same name
# holds them, {dotted key: value} (a study recorded before the digest holds them in the user attr).
FIXED_ATTR = "fixed_params"


def _matters(key: str) -> bool:
    """Whether ``key`` changes what a trial trains (not: where it logs, how many threads, the study's settings)."""
    return key not in NEUTRAL_KEYS and key.split(".")[0] not in ("tune", "mlflow")


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (what a study's user attrs hold: lists, not tuples)."""
    return json.loads(json.dumps(value, default=str))


def trial_sets(trial_flat: dict[str, Any], values: dict[str, Any], repo_flat: dict[str, Any] | None) -> dict[str, Any]:
    """The ``-S`` keys of a trial: its sampled ``values``, its ``train.epochs``, and every other key where its
    params (``trial_flat``) differ from the repo's params.yaml (``repo_flat``; None: unknown, the sampled ones)."""
    sets = {**values, "train.epochs": trial_flat["train.epochs"]}
    if repo_flat is not None:
        sets.update({k: v for k, v in sorted(trial_flat.items())
                     if k not in sets and _matters(k) and _plain(v) != _plain(repo_flat.get(k))})
    return sets


def dvc_command(sets: dict[str, Any]) -> str:
    """``dvc exp run -S key=value ...``: the trial as a DVC experiment of the full pipeline (tracked in MLflow,
    compared in ``dvc exp show``). Values are written as YAML reads them back (floats exactly)."""
    return "dvc exp run " + " ".join(f"-S {shlex.quote(f'{k}={_yaml_value(v)}')}" for k, v in sets.items())


def _yaml_value(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)  # the shortest text that reads back as the same float
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, list | tuple | dict):
        return json.dumps(_plain(v))  # JSON is YAML: a list or mapping, as DVC parses -S values
    return str(v)


def fixed_params(trial_flat: dict[str, Any], varied: set[str]) -> dict[str, Any]:
    """What every trial of a study shares: the trial params (before sampling) less the ``varied`` (search-space)
    keys and what does not change training."""
    return {k: _plain(v) for k, v in sorted(trial_flat.items()) if k not in varied and _matters(k)}


def fixed_digest(fixed: dict[str, Any]) -> str:
    """The short digest of a study's fixed params that ``optuna studies`` shows."""
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:12]


def check_fixed(study, storage, fixed: dict[str, Any], force: bool = False) -> None:
    """Record ``fixed`` in a new study (in ``storage``, the study's); refuse (one line naming the keys) to join one
    whose fixed params differ, unless ``force``. A study without the record gets it from the first worker that
    checks."""
    study_id = storage.get_study_id_from_name(study.study_name)
    shown = study.user_attrs.get(FIXED_ATTR)
    recorded = shown if isinstance(shown, dict) else storage.get_study_system_attrs(study_id).get(FIXED_ATTR)
    if recorded is None or isinstance(shown, dict):  # a new study, or one recorded in full in its user attrs
        storage.set_study_system_attr(study_id, FIXED_ATTR, recorded if recorded is not None else fixed)
        study.set_user_attr(FIXED_ATTR, fixed_digest(recorded if recorded is not None else fixed))
    if recorded is None:
        return
    differ = sorted(k for k in set(recorded) | set(fixed) if recorded.get(k) != fixed.get(k))
    if differ and not force:
        shown = ", ".join(f"{k} ({json.dumps(recorded.get(k))} in the study, {json.dumps(fixed.get(k))} here)"
                          for k in differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise ConfigError(f"study {study.study_name} holds other params fixed: {shown}; its trials would not be "
                          "comparable with these: use another tune.study_name (or --force to join anyway)")
