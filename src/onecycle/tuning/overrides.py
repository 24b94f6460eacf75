"""``onecycle tune -S key=value``: DVC's ``dvc exp run -S`` overrides, applied to the loaded params.

Each ``-S`` sets one dotted key (``schedule.max_lr``, ``tune.n_trials``, ``tune.space.train.epochs``) to a value
read as YAML 1.2, as DVC reads params.yaml (``1e-3`` is a number, ``[val/top1, train/seconds]`` a list, ``{low:
1, high: 4}`` a mapping, ``null`` none); later ``-S`` of the same key win. The result is validated like a params file:
a wrong key or value is one line naming it (exit 2). The study sees the overridden params, so each trial's
``dvc exp run -S ...`` names every key where they differ from the repository's params.yaml.
"""

from __future__ import annotations

from typing import Any

from onecycle.core.errors import ConfigError


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` as ``{key: value}``, each value read as YAML 1.2; ConfigError naming the bad one."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    sets: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not eq or not key or len(parts) < 2 or not all(parts):
            raise ConfigError(f"-S {item}: expected section.key=value, e.g. -S schedule.max_lr=0.1")
        try:
            value = YAML(typ="safe", pure=True).load(text)
        except YAMLError as exc:
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ConfigError(f"-S {item}: the value of {key} is not valid YAML: {problem}") from None
        sets[key] = value
    return sets


def apply_sets(params, sets: dict[str, Any]):
    """``params`` with each dotted key of ``sets`` replaced (nested mappings created as needed), validated; a
    ConfigError naming the key when the result is not valid params."""
    from onecycle.config import parse_params

    if not sets:
        return params
    raw = params.model_dump(mode="python")
    for key, value in sets.items():
        node = raw
        *path, last = key.split(".")
        for i, part in enumerate(path):
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"-S {key}: {'.'.join(path[:i + 1])} is not a mapping, so it has no key {last}")
            node = node.setdefault(part, {})
        node[last] = value
    try:
        return parse_params(raw)
    except ConfigError as exc:
        raise ConfigError(f"-S {_shown(sets, str(exc))}: {exc}") from None


def _shown(sets: dict[str, Any], message: str) -> str:
    """The ``-S`` the validation error is about (the key its message names), else all of them."""
    import json
    import re

    named = [k for k in sets if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message)]
    keys = named[:1] or list(sets)
    return " -S ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in ((k, sets[k]) for k in keys))
