"""The ``onecycle`` command: one subcommand per pipeline stage, each also runnable as ``python -m onecycle``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import OneCycleError
from .redact import install_log_filter, redact

# subcommand -> (module, one-line help). Only commands that are implemented are listed.
COMMANDS = {
    "fetch": ("onecycle.fetch", "fetch data.dataset into data/<dataset>/ (checksummed, fast to load)"),
    "lr-find": ("onecycle.lr_find", "run the LR range test; write reports/lr_find.json and .png"),
    "train": ("onecycle.train", "train with the One Cycle policy; track the run in MLflow"),
    "evaluate": ("onecycle.evaluate", "evaluate models/model.pt on the test split"),
    "promote": ("onecycle.promote", "move the registered model's @champion alias to @candidate if it beats it"),
    "predict": ("onecycle.predict", "top-k classes of image files from models/model.pt or an MLflow model"),
    "tune": ("onecycle.tune", "Optuna study over the One Cycle schedule; write reports/tune/ (best params, plots)"),
    "demo": ("onecycle.demo", "a web page on loopback to try the model: upload an image, see its top classes"),
}


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # MLflow, alembic and DVC are chatty at INFO; their warnings still show.
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL", "optuna", "git", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_log_filter()  # no credential (a storage URL's password) in any log line


def one_line(exc: BaseException) -> str:
    """The error as one line, credentials masked."""
    return redact(" ".join(str(exc).split()))


def run_command(name: str, description: str | None, argv: Sequence[str] | None,
                body: Callable[[object, argparse.Namespace], int | None],
                add_args: Callable[[argparse.ArgumentParser], None] | None = None,
                params_optional: bool = False) -> int:
    """Parse a stage's arguments, load params, run ``body(params, args)``; user errors become one line + exit code.

    With ``params_optional`` a missing params file means the defaults (for commands usable outside the repo).
    """
    from pathlib import Path

    from .config import load_params, parse_params

    parser = argparse.ArgumentParser(prog=f"onecycle {name}", description=description)
    parser.add_argument("--params", default="params.yaml", metavar="PATH", help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def body_with_params() -> int | None:
        if params_optional and args.params == "params.yaml" and not Path(args.params).exists():
            params = parse_params({})
        else:
            params = load_params(args.params)
        return body(params, args)

    return guarded(name, body_with_params)


def guarded(name: str, fn: Callable[[], int | None]) -> int:
    """Run ``fn``; user errors, interrupts and OS errors become one line on stderr and an exit code."""
    try:
        return int(fn() or 0)
    except OneCycleError as exc:
        print(f"onecycle {name}: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"onecycle {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # an unwritable folder, a full disk outside checkpoints: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"onecycle {name}: error: {redact(where)}{exc.strerror or one_line(exc)}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(
        prog="onecycle",
        description="Train ResNets with the One Cycle policy and an LR range test, as a DVC pipeline tracked in MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {c:<10} {h}" for c, (_, h) in COMMANDS.items())
        + "\n\nRun `onecycle COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"onecycle {__import__('onecycle').__version__}")
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    args = parser.parse_args(argv[:1])
    if args.command is None:
        parser.print_help()
        return 0 if not argv else 2
    return 0  # unreachable: known commands are dispatched above


