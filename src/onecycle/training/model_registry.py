"""The models ``model.name`` names: the registry of the built-in networks, and a user's own as an import path.

This is the only place that knows a model by name. :data:`MODELS` maps each built-in name to its record: the
factory that builds it and the ``model.*`` options it takes. Config accepts exactly these names, or an import path
``"package.module:factory"`` (:func:`is_import_path`), and keeps every option a model does not take at its default
(:func:`options_of`); :func:`onecycle.training.models.build_model` builds what the name says. A record names its
factory as an import path too, imported when a model is built, so importing this module imports nothing beyond the
standard library (params load without torch). Adding a built-in model is its factory in
:mod:`onecycle.training.models` and its record here.

A user's factory is called as ``factory(num_classes, in_channels)`` and returns a ``torch.nn.Module``. Its module is
imported from the import path: the installed packages, and the workspace, which every onecycle command puts on it
(:func:`onecycle.stages.command.run_command`); a served or exported model ships its top-level package
(:func:`copy_code`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onecycle.core.errors import ConfigError
from onecycle.core.registry import Registry

WIDTH, STEM, ZERO_INIT, WHITEN = "width", "stem", "zero_init_residual", "whiten"  # the model.* options
IMPORT_PATH = "package.module:factory"  # the shape of a user's model.name


@dataclass(frozen=True)
class ModelKind:
    """A built-in model: ``factory(num_classes, in_channels, **options, **fixed)`` builds it."""

    factory: str  # an import path "module:function", imported when the model is built
    options: tuple[str, ...] = ()  # the model.* keys passed to the factory as keywords
    fixed: dict[str, Any] = field(default_factory=dict)  # keywords every call passes

    def factory_function(self) -> Callable:
        module, _, function = self.factory.partition(":")
        return getattr(importlib.import_module(module), function)


MODELS: Registry[ModelKind] = Registry("model.name")
# DAWNBench's ResNet9: scales its width, and has a whitening form of its prep layer (with the cifar stem).
MODELS.register("resnet9")(ModelKind("onecycle.training.models:resnet9", (WIDTH, STEM, ZERO_INIT, WHITEN)))
for _depth in (18, 34, 50, 101, 152):  # torchvision's ResNets at full width, their first convolution made for the stem
    MODELS.register(f"resnet{_depth}")(ModelKind("onecycle.training.models:torchvision_resnet", (STEM, ZERO_INIT),
                                                 {"arch": f"resnet{_depth}"}))


def is_import_path(name: str) -> bool:
    """Whether ``name`` has the shape ``"package.module:factory"``: dotted identifiers, one colon between."""
    module, colon, attr = name.partition(":")
    return bool(colon) and all(part.isidentifier() for part in (*module.split("."), *attr.split(".")))


def check_name(name: str) -> str:
    """``name`` when it is a registered model or an import path; else ValueError saying what model.name takes."""
    if name in MODELS or is_import_path(name):
        return name
    choices = ", ".join(repr(n) for n in MODELS.names())
    raise ValueError(f"model.name must be one of {choices}, or an import path {IMPORT_PATH!r} of your own model; "
                     f"got {name!r}")


def options_of(name: str) -> tuple[str, ...]:
    """The model.* options model ``name`` takes; a user's factory takes none (only num_classes and in_channels)."""
    kind = MODELS.get(name)
    return kind.options if kind else ()


def _where(exc: BaseException) -> str:
    """`` (file:line)`` of the user code an exception came from (its innermost frame outside onecycle), or ''."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({_short(exc.filename)}:{exc.lineno})"
    skip = ("<", str(Path(__file__).parents[1]), sysconfig.get_paths()["stdlib"])  # importlib, onecycle
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(skip)
              and not {"site-packages", "dist-packages"} & set(Path(f.filename).parts)]  # torch's
    return f" ({_short(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""


def _short(path: str) -> str:
    """A file as its module is named: relative to the import path's folder it was found under (``pkg/net.py``)."""
    roots = [p for p in sys.path if p and path.startswith(os.path.join(p, ""))]
    return os.path.relpath(path, max(roots, key=len)) if roots else path


def _failure(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split()) + _where(exc)


def _no_module(name: str, module: str) -> ConfigError:
    return ConfigError(f"model.name {name!r}: no module {module} in the workspace (the folder onecycle runs in) or "
                       f"the installed packages")


def import_factory(path: str) -> Callable:
    """The callable an import path ``"module:attr"`` names; a module that is missing or fails to import, or a name
    that is missing or not callable, raises ConfigError in one line naming model.name and the module."""
    module_name, _, attr = path.partition(":")
    head = f"model.name {path!r}"
    importlib.invalidate_caches()  # a module written since the last import is seen
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            raise _no_module(path, module_name) from None
        raise ConfigError(f"{head}: importing {module_name} failed: {_failure(exc)}") from None
    except Exception as exc:  # the user's module raised on import (a syntax error, a missing name, ...)
        raise ConfigError(f"{head}: importing {module_name} failed: {_failure(exc)}") from None
    source = _short(getattr(obj, "__file__", None) or module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{head}: module {module_name} ({source}) has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{head}: {module_name}.{attr} ({source}) is a {type(obj).__name__}, not a function "
                          f"{attr}(num_classes, in_channels) returning a torch.nn.Module")
    return obj


def call_factory(path: str, factory: Callable, *args: Any) -> Any:
    """``factory(*args)``; an exception it raises becomes ConfigError in one line naming model.name and where."""
    try:
        return factory(*args)
    except Exception as exc:
        module_name, _, attr = path.partition(":")
        raise ConfigError(f"model.name {path!r}: {module_name}.{attr}{args} raised {_failure(exc)}") from None


def code_of(name: str) -> Path | None:
    """The top-level package folder (or module file) holding a user's factory: the code a served model ships so that
    it imports where the workspace is not on the path. None for a registered model and for onecycle's own modules
    (the served model ships onecycle whole)."""
    top = name.partition(":")[0].split(".")[0]
    if not is_import_path(name) or top == "onecycle":
        return None
    spec = importlib.util.find_spec(top)
    if spec is None:
        raise _no_module(name, top)
    if spec.submodule_search_locations:  # a package (or a namespace package's first folder)
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin)


def copy_code(name: str, folder: Path) -> Path | None:
    """Copy :func:`code_of` ``name`` (without caches) into ``folder`` under its own name, replacing an older copy: what
    a served or exported model puts on its path. Returns the copy, or None when there is nothing to ship."""
    source = code_of(name)
    if source is None:
        return None
    target = Path(folder) / source.name
    if target.is_dir():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        return Path(shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")))
    return Path(shutil.copyfile(source, target))
