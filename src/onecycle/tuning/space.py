"""The search-space language of ``tune.space``: which params a study varies, over what range, and how.

``tune.space`` maps dotted keys (``schedule.max_lr``) to ``{low, high, log, type}`` ranges or ``{choices}``;
``{}`` means the default space: max_lr a decade either side of the LR finder's suggestion, pct_start
0.1-0.5, div_factor 5-100. Every range is checked against the params' own validation at load time
(a ConfigError naming ``tune.space.<key>``), and :func:`trial_params` builds one trial's params.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onecycle.core.errors import ConfigError
from onecycle.training.lr_report import read_suggestion
from onecycle.training.schedule import peak_overrides_pct_start

# Sections whose keys a search space may draw from.
TUNABLE_SECTIONS = ("schedule", "optimizer", "model", "train", "data")
# Keys that stay fixed: they change the data the metric is measured on.
_FIXED = {"data.dataset", "data.source", "data.root", "data.val_size"}
_SPEC_FIELDS = ("low", "high", "log", "type", "choices")


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


def _default_spec(params, key: str, lr_find_report: Path | None) -> dict[str, Any]:
    """A default key's range. ``schedule.max_lr``: log-uniform over one decade either side of ``schedule.max_lr``
    when it is a number, else of the LR finder's chosen suggestion (read from ``lr_find_report``, the
    workspace's reports/lr_find.json); ``schedule.pct_start``: uniform 0.1..0.5; ``schedule.div_factor``:
    log-uniform 5..100."""
    if key == "schedule.max_lr":
        centre = params.schedule.max_lr
        if centre == "auto":
            if lr_find_report is None:
                raise ValueError("schedule.max_lr is auto: the search space needs the LR finder's report")
            centre = read_suggestion(lr_find_report)
        return {"low": centre / 10, "high": centre * 10, "log": True}
    if key == "schedule.pct_start":
        return {"low": 0.1, "high": 0.5}
    return {"low": 5.0, "high": 100.0, "log": True}


def search_space(params, lr_find_report: Path | None = None) -> dict[str, Dimension]:
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
        if key == "schedule.pct_start" and peak_overrides_pct_start(params.schedule) and key not in user:
            continue  # peak_epoch overrides pct_start
        if key in user and not isinstance(given, dict):
            specs[key] = given  # wrong: _dimension says why
        elif key in user and _complete(given):
            # bounds given in full: the default's scale stays unless the entry says otherwise
            specs[key] = given if "choices" in given else {"log": key != "schedule.pct_start", **given}
        else:
            specs[key] = {**_default_spec(params, key, lr_find_report), **(given or {})}
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
    from onecycle.config import Params

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
    if key == "schedule.pct_start" and peak_overrides_pct_start(params.schedule):
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
