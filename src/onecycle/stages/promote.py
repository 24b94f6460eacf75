"""promote: make the evaluated ``candidate`` the registered model's ``champion``, if it beats the current one.

``onecycle evaluate`` tags the version that training registered with its test top-1/top-5 and the test
split's digest, and gives it the alias ``@candidate``. ``onecycle promote`` moves ``@champion`` to that
version when its test top-1 is higher than the champion's on the same test data (same digest); it refuses
otherwise, in one line, and ``--force`` promotes anyway. Serving and ``onecycle predict --model-uri``
then use ``models:/<mlflow.registered_model>@champion``. No deprecated model-registry stages are used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onecycle.core.errors import OneCycleError
from onecycle.core.paths import Workspace
from onecycle.stages.command import run_command
from onecycle.tracking import store
from onecycle.tracking.registry import CANDIDATE, CHAMPION, DIGEST, TOP1


def _version_by_alias(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # MLflow raises for an alias that is not set
        return None


def _top1(version) -> float | None:
    try:
        return float(version.tags[TOP1])
    except (KeyError, ValueError):
        return None


def run(params, ws: Workspace, force: bool = False) -> dict:
    """Move ``@champion`` to ``@candidate`` if it is better on the same test data (or ``force``); return what was done."""
    name = params.mlflow.registered_model
    if not name:
        raise OneCycleError("mlflow.registered_model is not set, so there is no registered model to promote")
    db = store.workspace_root(ws.root) / store.STORE
    if not store.user_tracking_uri() and not db.is_file():
        raise OneCycleError(f"no MLflow store at {db}: run `onecycle train` and `onecycle evaluate` "
                            "(or `dvc repro`) first")
    mlflow = store.mlflow()
    store.configure(None, ws.root)
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except Exception:
        raise OneCycleError(f"no registered model {name!r} in {mlflow.get_tracking_uri()}: run `onecycle train` "
                            "and `onecycle evaluate` (or `dvc repro`) first") from None
    cand = _version_by_alias(client, name, CANDIDATE)
    if cand is None:
        raise OneCycleError(f"{name} has no @{CANDIDATE} version: run `onecycle evaluate` (or `dvc repro`) first")
    cand_top1 = _top1(cand)
    if cand_top1 is None and not force:
        raise OneCycleError(f"{name} version {cand.version} has no {TOP1} tag: run `onecycle evaluate` first")
    champ = _version_by_alias(client, name, CHAMPION)
    result = {"model": name, "candidate": cand.version, "previous_champion": champ.version if champ else None,
              "candidate_top1": cand_top1, "champion_top1": _top1(champ) if champ else None}
    if champ is not None and champ.version == cand.version:
        print(f"promote: {name} version {cand.version} is already @{CHAMPION} (test top-1 {cand_top1}); nothing to do")
        return {**result, "promoted": False}
    if champ is not None and not force:
        champ_top1 = _top1(champ)
        if cand.tags.get(DIGEST) != champ.tags.get(DIGEST):
            raise OneCycleError(
                f"refused: {name} version {cand.version} was tested on data {cand.tags.get(DIGEST)}, the champion "
                f"(version {champ.version}) on {champ.tags.get(DIGEST)}; the accuracies are not comparable "
                "(--force promotes anyway)")
        if champ_top1 is not None and cand_top1 <= champ_top1:
            raise OneCycleError(
                f"refused: {name} version {cand.version} (test top-1 {cand_top1:.4f}) does not beat the champion, "
                f"version {champ.version} ({champ_top1:.4f}), on the same test data (--force promotes anyway)")
    client.set_registered_model_alias(name, CHAMPION, cand.version)
    if champ is None:
        why = "the first champion"
    elif force:
        why = f"forced, replacing version {champ.version} (test top-1 {_top1(champ)})"
    else:
        why = f"test top-1 {cand_top1:.4f} beats version {champ.version}'s {_top1(champ):.4f} on the same test data"
    print(f"promote: {name} version {cand.version} is now @{CHAMPION} ({why}); serve it with "
          f"`mlflow models serve -m models:/{name}@{CHAMPION} --env-manager local`")
    return {**result, "promoted": True}


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="promote the candidate even if it is not better or was tested on other data")


def main(argv=None) -> int:
    return run_command("promote", __doc__.splitlines()[0], argv,
                       lambda params, args: run(params, Workspace(Path(".")), force=args.force) and 0,
                       _add_args, params_optional=True)


if __name__ == "__main__":
    raise SystemExit(main())
