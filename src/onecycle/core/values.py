"""What a value a user gives must be where it goes, checked where params are loaded (:mod:`onecycle.config`):
numbers that torch and NumPy take, names that MLflow, its filter strings and Optuna take, storage strings
that outlive the process, and names compared as users see them.

Each check returns the problem as the end of a one-line message (the caller names the key) or raises
``ValueError`` with the dotted key in it, as pydantic validators do.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

# The largest whole number a count or size may be: a C int, what torch and NumPy take for one.
INT_MAX = 2**31 - 1
# Seeds go up to NumPy's (32-bit); torch takes more.
SEED_MAX = 2**32 - 1


def check_int(value: Any, bounds: list) -> Any:
    """``value`` if it is no int or fits a C int; a field with its own upper bound (``bounds``: its pydantic
    metadata, e.g. a seed's) is left to that bound."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
        if not any(hasattr(b, "le") or hasattr(b, "lt") for b in bounds):
            raise ValueError(f"must be at most {INT_MAX} (what torch and NumPy take), got {value}")
    return value


def number_problem(value: Any, key: str) -> str | None:
    """The first number anywhere in ``value`` (a transform's arguments, a search space) that no consumer takes:
    NaN or infinite, or a whole number beyond a C int; one line naming its dotted key, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} must be a finite number, got {value}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
        return f"{key} must be at most {INT_MAX} (what torch and NumPy take), got {value}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for k, v in items:
        problem = number_problem(v, f"{key}[{k}]" if isinstance(k, int) else f"{key}.{k}")
        if problem:
            return problem
    return None


def sweep_end_problem(start_lr: float, step_mult: float, num_iter: int) -> str | None:
    """Why ``start_lr * step_mult ** (num_iter - 1)``, an LR range test's last LR, is no usable float (or None)."""
    if math.log(start_lr) + (num_iter - 1) * math.log(step_mult) < math.log(1e300):
        return None
    return (f"lr_find.step_mult: {step_mult:g} over {num_iter} steps from lr_find.start_lr {start_lr:g} goes beyond "
            "1e300; use a smaller step_mult or num_iter")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# key -> (characters the name cannot hold, why, longest length): the registered model's name goes into model URIs
# (models:/NAME@ALIAS) and, with every name, into MLflow filter strings (name = 'NAME'); Optuna's RDB column is 512
NAME_RULES = {
    "mlflow.registered_model": ("/:@'\"\\", "it goes into models:/NAME@ALIAS URIs and MLflow searches", 250),
    "mlflow.experiment": ("'\"\\", "it goes into MLflow searches", 250),
    "tune.study_name": ("'\"\\", "it goes into MLflow tags and searches", 250),
}


def checked_name(value: Any, key: str) -> Any:
    """``value`` as a name for ``key`` (:data:`NAME_RULES`), in Unicode NFC (what a user types on any system names
    the same thing); raises ValueError naming the key when the name cannot go where it goes."""
    if not isinstance(value, str):
        return value  # pydantic says what type it must be
    name = unicodedata.normalize("NFC", value)
    forbidden, why, longest = NAME_RULES[key]
    if not name.strip():
        raise ValueError(f"{key} must be a name, got {value!r}")
    if name != name.strip():
        raise ValueError(f"{key} must not begin or end with a space, got {value!r}")
    bad = sorted({c for c in name if c in forbidden} | set(_CONTROL.findall(name)))
    if bad:
        raise ValueError(f"{key} cannot hold {' '.join(map(repr, bad))} ({why}), got {value!r}")
    if len(name) > longest:
        raise ValueError(f"{key} must be at most {longest} characters, got {len(name)}")
    return name


# sqlite:// and sqlite:///:memory: (any driver) are SQLite in memory: a study there vanishes with the process
_IN_MEMORY = re.compile(r"^sqlite(\+\w+)?://(/(:memory:|file::memory:.*)?)?$", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def storage_problem(url: str) -> str | None:
    """Why an Optuna storage string cannot hold a study that outlives the process (or None): empty, in memory, or
    a URL without its ``//`` (which would be taken for a file path)."""
    if not url.strip():
        return "is empty: leave it out (null) for the default journal file, or give a file path or an RDB URL"
    if url != url.strip():
        return f"must not begin or end with a space, got {url!r}"
    if _CONTROL.search(url):
        return f"holds a control character, got {url!r}"
    if _IN_MEMORY.match(url) or url == ":memory:":
        return (f"{url} is a database in memory: the study would vanish with this process; use a file "
                "(sqlite:///reports/tune/study.db) or leave tune.storage null for the default journal file")
    if "://" not in url and _SCHEME.match(url):
        return f"{url} looks like a URL without '//' after its scheme (postgresql://host/db, sqlite:///file.db)"
    return None


def comparable(name: str) -> str:
    """A name as users see it, for comparing names from different systems: Unicode NFC (macOS writes file names
    decomposed, NFD), without leading or trailing spaces, case folded."""
    return shown(name).casefold()


def shown(name: str) -> str:
    """A name as it is shown and recorded: Unicode NFC, without leading or trailing spaces (case kept)."""
    return unicodedata.normalize("NFC", name).strip()
