"""The ``onecycle`` command, the top of the package: it dispatches each subcommand to its stage module
(``onecycle.stages.*``), imported only when that command runs. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help)
COMMANDS = {
    "fetch": ("onecycle.stages.fetch", "fetch data.dataset into data/<dataset>/ (checksummed, fast to load)"),
    "lr-find": ("onecycle.stages.lr_find", "run the LR range test; write reports/lr_find.json and .png"),
    "train": ("onecycle.stages.train", "train with the One Cycle policy; track the run in MLflow"),
    "evaluate": ("onecycle.stages.evaluate", "evaluate models/model.pt on the test split"),
    "publish": ("onecycle.stages.publish", "register the evaluated model (@candidate) with its test results"),
    "promote": ("onecycle.stages.promote", "make the best evaluated version the registered model's @champion"),
    "predict": ("onecycle.stages.predict", "top-k classes of image files from models/model.pt or an MLflow model"),
    "tune": ("onecycle.stages.tune", "Optuna study over the One Cycle schedule; write reports/tune/ (best params, plots)"),
    "demo": ("onecycle.stages.demo", "a web page on loopback to try the model: upload an image, see its top classes"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``onecycle COMMAND ...`` to the command's stage module; without one, print the help."""
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
    parser.parse_args(argv[:1])  # --help, --version and unknown commands end here
    parser.print_help()
    return 0
