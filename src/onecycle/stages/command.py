"""How every stage command runs: its arguments, its params file, and its errors as one line and an exit code.

Each stage's ``main(argv)`` calls :func:`run_command` with the function that does its work; a user error
(:class:`~onecycle.core.errors.OneCycleError`), an interrupt, an OS error or an error of the MLflow store
becomes one line on stderr, never a traceback, with the credentials in it masked.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

from onecycle.core.errors import NO_SPACE_ERRNOS, OneCycleError, no_space_message
from onecycle.core.redact import install_log_filter, one_line, redact


class CommandLines(logging.Formatter):
    """Every log line of a command in the style of its own output lines: ``train: message``, ``train: warning:
    message``; a library's line names the library (``train: warning: mlflow: ...``), and ``-v`` names every logger."""

    def __init__(self, prefix: str, verbose: bool = False):
        super().__init__()
        self.prefix, self.verbose = prefix, verbose

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        if self.verbose:
            origin = f"{record.name}: "
        else:
            origin = "" if record.name.split(".")[0] in ("onecycle", "__main__", "root") else \
                f"{record.name.split('.')[0]}: "
        text = record.getMessage()
        if record.exc_info and self.verbose:
            text += "\n" + self.formatException(record.exc_info)
        return f"{self.prefix}: {level}{origin}{text}"


def setup_logging(verbose: bool = False, name: str = "onecycle") -> None:
    """Log to stderr in the command's own style (:class:`CommandLines`, prefixed with the command ``name``)."""
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(CommandLines(name.replace("-", "_"), verbose))
    logging.basicConfig(level=level, handlers=[handler])
    # MLflow, alembic and DVC are chatty at INFO; their warnings still show.
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL", "optuna", "git", "numexpr", "onnxscript",
                  "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # MLflow's lines come here too, in this style (MLflow would give its loggers a handler of its own on import)
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    install_log_filter()  # no credential (a storage URL's password) in any log line


def run_command(name: str, description: str | None, argv: Sequence[str] | None,
                body: Callable[[object, argparse.Namespace], int | None],
                add_args: Callable[[argparse.ArgumentParser], None] | None = None,
                params_optional: bool = False) -> int:
    """Parse a stage's arguments, load params, run ``body(params, args)``; user errors become one line + exit code.

    With ``params_optional`` a missing params file means the defaults (for commands usable outside the repo).
    """
    from pathlib import Path

    from onecycle.config import load_params, parse_params

    parser = argparse.ArgumentParser(prog=f"onecycle {name}", description=plain_text(description))
    parser.add_argument("--params", default="params.yaml", metavar="PATH", help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, name)
    workspace_importable()

    def body_with_params() -> int | None:
        if params_optional and args.params == "params.yaml" and not Path(args.params).exists():
            params = parse_params({})
        else:
            params = load_params(args.params)
        return body(params, args)

    return guarded(name, body_with_params)


def plain_text(doc: str | None) -> str | None:
    """A docstring line as ``--help`` shows it: reST roles and literals (``x``, :mod:`x`) as their plain text."""
    if doc is None:
        return None
    return re.sub(r"(?::[a-z]+:)?`{1,2}([^`]+)`{1,2}", r"\1", doc)


def workspace_importable() -> None:
    """Put the workspace (the cwd: the DVC repository's root) on the import path, as ``python -m`` does but after the
    installed packages: a user's ``model.name: "package.module:factory"`` is imported from there."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


# The module a missing optional dependency shows up as -> the extra of pyproject.toml that installs it.
EXTRAS = {"gradio": "demo", "psycopg": "postgres", "psycopg_binary": "postgres", "boto3": "s3", "botocore": "s3",
          "s3fs": "s3", "dvc_s3": "s3"}


def guarded(name: str, fn: Callable[[], int | None]) -> int:
    """Run ``fn``; user errors, interrupts, OS errors and MLflow store errors become one line and an exit code."""
    try:
        return int(fn() or 0)
    except OneCycleError as exc:
        print(f"onecycle {name}: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"onecycle {name}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:  # an optional extra (pyproject.toml) this environment lacks
        module = (exc.name or "").split(".")[0]
        extra = EXTRAS.get(module)
        if extra is None:
            raise
        print(f"onecycle {name}: error: {module} is not installed: pip install 'onecycle[{extra}]' "
              f"(`make setup` installs every extra)", file=sys.stderr)
        return 1
    except OSError as exc:  # an unwritable folder, a full disk outside checkpoints: one line, not a traceback
        if exc.errno in NO_SPACE_ERRNOS:  # a copy (MLflow's artifacts) names its source first, its target second
            print(f"onecycle {name}: error: {redact(no_space_message(exc.filename2 or exc.filename, exc))}",
                  file=sys.stderr)
            return 1
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"onecycle {name}: error: {redact(where)}{exc.strerror or one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not _from_the_store(exc):
            raise
        print(f"onecycle {name}: error: the MLflow store {redact(_tracking_uri())} failed: {one_line(exc)[:300]}",
              file=sys.stderr)
        return 1


def _from_the_store(exc: BaseException) -> bool:
    """Whether an exception was raised by MLflow or the database library under it (a locked, broken or vanished
    store met after the stage's store check): it is reported in one line with the store's URI."""
    return any(cls.__module__.split(".")[0] in ("mlflow", "sqlalchemy") for cls in type(exc).__mro__)


def _tracking_uri() -> str:
    mlflow = sys.modules.get("mlflow")  # an MLflow error means MLflow is imported; never import it here
    try:
        return mlflow.get_tracking_uri() if mlflow else os.environ.get("MLFLOW_TRACKING_URI", "?")
    except Exception:
        return os.environ.get("MLFLOW_TRACKING_URI", "?")
