"""promote: choose the registered model's @champion among the evaluated versions, and show the choice.

``onecycle evaluate`` tags the version that training registered with its test top-1/top-5 and the test
split's digest, and gives it the alias ``@candidate`` (the latest evaluated version: a marker, not a verdict).
``onecycle promote`` lists every evaluated version (test top-1, test split, DVC experiment, epochs, training
subset) and moves ``@champion`` to the best one *trained on all the training data* and *tested on the
champion's test split* (the candidate's, before the first champion); the champion keeps the alias unless
another is strictly better. ``--version N`` promotes that version; one trained on a subset, tested on another
split or never evaluated is refused in one line unless ``--force`` (``--force`` alone promotes ``@candidate``).
It prints the change (old -> new, with scores). Serving and ``onecycle predict --model-uri`` use
``models:/<mlflow.registered_model>@champion``. No deprecated model-registry stages are used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onecycle.core.errors import OneCycleError
from onecycle.core.paths import Workspace
from onecycle.stages.command import run_command
from onecycle.tracking import store
from onecycle.tracking.registry import (
    CANDIDATE,
    CHAMPION,
    TOP1,
    Version,
    registered_model_exists,
    registered_versions,
    set_champion,
    version_problem,
)


def _table(name: str, versions: list[Version]) -> str:
    rows = [("version", "test top-1", "test split", "epochs", "train subset", "experiment", "aliases")]
    rows += [(str(v.number), "-" if v.top1 is None else f"{v.top1:.4f}", v.digest or "-", v.epochs,
              "all" if v.subset is None else v.subset, v.experiment, ", ".join(f"@{a}" for a in v.aliases))
             for v in versions]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i < 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    return f"promote: {name}, {len(versions)} registered version(s):\n" + "\n".join("  " + ln.rstrip() for ln in lines)


def _why_not(v: Version, digest: str | None, champ: Version | None) -> str | None:
    """Why ``v`` cannot be champion without --force (None: it can)."""
    if v.top1 is None:
        return f"version {v.number} was never evaluated (no {TOP1} tag): run `onecycle evaluate` on it first"
    if v.subset == "?":
        return f"version {v.number}'s training run is not in the store, so nothing says what data it trained on"
    if v.subset is not None:
        return f"version {v.number} was trained on a subset of the training data (data.train_subset={v.subset})"
    if digest is not None and v.digest != digest:
        whose = f"the champion's (version {champ.number})" if champ else "the candidate's"
        return (f"version {v.number} was tested on data {v.digest}, {whose} on {digest}; "
                "the accuracies are not comparable")
    return None


def _open_registry(name: str | None, ws: Workspace) -> str:
    """The registered model's name, once the store that holds it is configured; one line if either is missing."""
    if not name:
        raise OneCycleError("mlflow.registered_model is not set, so there is no registered model to promote")
    db = store.workspace_root(ws.root) / store.STORE
    if not store.user_tracking_uri() and not db.is_file():
        raise OneCycleError(f"no MLflow store at {db}: run `onecycle train` and `onecycle evaluate` "
                            "(or `dvc repro`) first")
    store.configure(None, ws.root)
    if not registered_model_exists(name):
        raise OneCycleError(f"no registered model {name!r} in {store.tracking_uri()}: run `onecycle train` "
                            "and `onecycle evaluate` (or `dvc repro`) first")
    return name


def _choose(name: str, versions: list[Version], champ: Version | None, cand: Version | None, digest: str | None,
            version: int | None, force: bool) -> Version:
    """The version to be champion: ``version`` (refused if ineligible unless ``force``), the candidate when only
    ``force`` is given, else the best eligible one (the champion keeps it on a tie)."""
    if version is not None:
        by_number = {v.number: v for v in versions}
        if version not in by_number:
            raise OneCycleError(f"{name} has no version {version} (versions: "
                                f"{', '.join(str(v.number) for v in reversed(versions)) or 'none'})")
        chosen = by_number[version]
        why = _why_not(chosen, digest, champ)
        if why and not force:
            raise OneCycleError(f"refused: {why} (--force promotes it anyway)")
        return _loads(name, chosen)
    if force:  # --force alone: the candidate, whatever it is, if it loads
        return _loads(name, cand)
    eligible = [v for v in versions if _why_not(v, digest, champ) is None]
    broken = {v.number: why for v in eligible if (why := version_problem(name, v.number))}
    for number, why in broken.items():  # it would serve nothing: never the champion
        print(f"promote: version {number} cannot be loaded, so it is not eligible: {why}", flush=True)
    eligible = [v for v in eligible if v.number not in broken]
    if not eligible:
        raise OneCycleError(f"refused: no version of {name} is evaluated, trained on all the training data, "
                            f"tested on {digest} and loadable: "
                            f"{(_why_not(cand, digest, champ) or broken.get(cand.number, '')) if cand else ''} "
                            "(`--version N --force` promotes one anyway)")
    best = max(v.top1 for v in eligible)
    return champ if champ in eligible and champ.top1 == best else \
        max((v for v in eligible if v.top1 == best), key=lambda v: v.number)


def _loads(name: str, v: Version) -> Version:
    """``v``, or one line saying why it cannot be the champion whatever --force says: it cannot be loaded."""
    if (why := version_problem(name, v.number)) is not None:
        raise OneCycleError(f"refused: version {v.number} of {name} cannot be loaded, so it would serve nothing: {why}")
    return v


def run(params, ws: Workspace, force: bool = False, version: int | None = None) -> dict:
    """Move ``@champion`` to the best eligible evaluated version (or ``version``); return what was done."""
    name = _open_registry(params.registered_model, ws)
    versions = registered_versions(name)
    champ = next((v for v in versions if CHAMPION in v.aliases), None)
    cand = next((v for v in versions if CANDIDATE in v.aliases), None)
    if version is None and cand is None:
        raise OneCycleError(f"{name} has no @{CANDIDATE} version: run `onecycle evaluate` (or `dvc repro`) first")
    print(_table(name, versions), flush=True)
    digest = champ.digest if champ is not None else (cand.digest if cand is not None else None)
    result = {"model": name, "previous_champion": champ.number if champ else None,
              "champion_top1": champ.top1 if champ else None}
    chosen = _choose(name, versions, champ, cand, digest, version, force)
    result.update(candidate=chosen.number, candidate_top1=chosen.top1)
    if champ is not None and champ.number == chosen.number:
        note = ""
        if version is None and cand is not None and cand.number != champ.number:
            why = _why_not(cand, digest, champ)
            note = (f"; @{CANDIDATE} {cand.describe()} " + (f"is not eligible: {why}" if why else
                                                              "does not beat it"))
        print(f"promote: {name} {chosen.describe()} stays @{CHAMPION}, the best eligible version{note}")
        return {**result, "promoted": False}
    set_champion(name, chosen.number)
    old = "no champion" if champ is None else f"{champ.describe()}"
    how = " (forced)" if force else ""
    print(f"promote: {name} @{CHAMPION}: {old} -> {chosen.describe()}{how}; serve it with "
          f"`mlflow models serve -m models:/{name}@{CHAMPION} --env-manager local`")
    return {**result, "promoted": True}


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", type=int, metavar="N", help="promote version N (default: the best eligible one)")
    p.add_argument("--force", action="store_true",
                   help="promote --version N (or the @candidate) even if trained on a subset, tested on other data "
                        "or never evaluated")


def main(argv=None) -> int:
    return run_command("promote", __doc__.splitlines()[0], argv,
                       lambda params, args: run(params, Workspace(Path(".")), force=args.force,
                                                version=args.version) and 0,
                       _add_args, params_optional=True)


if __name__ == "__main__":
    raise SystemExit(main())
