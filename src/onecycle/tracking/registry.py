"""The model registry's side of a trained model: the aliases (``candidate``, ``champion``), the tags a
version carries after ``evaluate`` (its test metrics, the test split's digest, git commit, DVC experiment),
the digest that says two versions were tested on the same data, the recipe a version serves (so that publishing
the same model again finds its version), and the registered versions as ``onecycle promote`` judges them
(:class:`Version`, :func:`registered_versions`) and moves ``@champion`` among them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from onecycle.tracking import store

CANDIDATE, CHAMPION = "candidate", "champion"  # registered-model aliases
TOP1, TOP5, DIGEST = "test/top1", "test/top5", "test/dataset_digest"  # model-version tags
RECIPE_TAG = "model_digest"  # a version's tag: the digest of the model file and test-time augmentation it serves


def test_digest(info) -> str:
    """A digest of the test split as fetch wrote it (the md5s meta.json lists for the test files)."""
    meta = json.loads((Path(info.folder) / "meta.json").read_text())
    files = {name: md5 for name, md5 in sorted((meta.get("files") or {}).items()) if name.startswith("test")}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


test_digest.__test__ = False  # not a pytest test, whatever its name


def mark_version(name: str, version: int | str, run_id: str, test_metrics: dict, digest: str,
                 extra: dict[str, str] | None = None) -> None:
    """Tag version ``version`` of ``name`` with its test results (``test_metrics``: evaluate's), the test split's
    ``digest``, the git commit and DVC experiment of its training run ``run_id``; alias it ``candidate``."""
    client = store.mlflow().MlflowClient()
    run_tags = client.get_run(run_id).data.tags
    tags = {TOP1: f"{test_metrics['top1']:.6f}", TOP5: f"{test_metrics['top5']:.6f}", DIGEST: digest,
            "git_commit": run_tags.get("git_commit", "unknown"), **(extra or {})}
    if run_tags.get("dvc_exp_name"):
        tags["dvc_experiment"] = run_tags["dvc_exp_name"]
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    client.set_registered_model_alias(name, CANDIDATE, str(version))


def _recipe_of(client, version) -> str | None:
    """The recipe a version serves: its tag, or its logged model's (a publish stopped before tagging the version)."""
    if version.tags.get(RECIPE_TAG):
        return version.tags[RECIPE_TAG]
    try:
        return client.get_logged_model(version.model_id).tags.get(RECIPE_TAG)
    except Exception:  # a version without a logged model (registered by hand from a path)
        return None


def versions_serving(name: str, run_id: str, recipe: str) -> list[int]:
    """The versions of ``name`` registered from the run ``run_id`` that serve ``recipe`` (published before)."""
    client = store.mlflow().MlflowClient()
    return [int(v.version) for v in client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
            if _recipe_of(client, v) == recipe]


def tag_recipe(name: str, version: int | str, recipe: str) -> None:
    """Tag version ``version`` of ``name`` with the recipe it serves (:data:`RECIPE_TAG`)."""
    store.mlflow().MlflowClient().set_model_version_tag(name, str(version), RECIPE_TAG, recipe)


@dataclass
class Version:
    """A registered version as promotion judges it."""

    number: int
    top1: float | None  # test top-1 from evaluate; None: never evaluated
    digest: str | None  # the test split it was evaluated on
    subset: str | None  # data.train_subset of its training run; None: all the training data; "?": run not found
    epochs: str
    experiment: str
    aliases: list[str]

    def describe(self) -> str:
        """``version N (test top-1 0.9123)``, or ``(not evaluated)``."""
        score = "not evaluated" if self.top1 is None else f"test top-1 {self.top1:.4f}"
        return f"version {self.number} ({score})"


def _top1(version) -> float | None:
    try:
        return float(version.tags[TOP1])
    except (KeyError, ValueError, AttributeError):
        return None


def registered_model_exists(name: str) -> bool:
    """Whether the store holds a registered model ``name``."""
    try:
        store.mlflow().MlflowClient().get_registered_model(name)
    except Exception:
        return False
    return True


def registered_versions(name: str) -> list[Version]:
    """Every version of the registered model ``name``, newest first, with what promotion judges it by."""
    client = store.mlflow().MlflowClient()
    aliases: dict[int, list[str]] = {}  # from the registered model: search results do not always carry them
    for alias, number in (client.get_registered_model(name).aliases or {}).items():
        aliases.setdefault(int(number), []).append(alias)
    out = []
    for mv in client.search_model_versions(f"name='{name}'"):
        try:
            run_params = client.get_run(mv.run_id).data.params if mv.run_id else {}
            subset = run_params.get("data.train_subset", "null")
            subset = None if subset in ("null", "None", "") else subset
        except Exception:  # the training run was deleted from the store: nothing says what it trained on
            run_params, subset = {}, "?"
        out.append(Version(int(mv.version), _top1(mv), mv.tags.get(DIGEST), subset, run_params.get("train.epochs", "?"),
                           mv.tags.get("dvc_experiment", "-"), sorted(aliases.get(int(mv.version), []))))
    return sorted(out, key=lambda v: -v.number)


def version_problem(name: str, version: int | str) -> str | None:
    """Why version ``version`` of ``name`` cannot be loaded, or None: its MLmodel and every file that MLmodel names
    (the model file, the models-from-code script, the code folder, a flavor's data) must be in the artifact store."""
    mlflow = store.mlflow()
    uri = f"models:/{name}/{version}"
    try:
        info = mlflow.models.get_model_info(uri)  # reads its MLmodel
    except Exception as exc:
        return f"its MLmodel cannot be read ({' '.join(str(exc).split())[:160]})"
    pyfunc, torch_flavor = info.flavors.get("python_function") or {}, info.flavors.get("pytorch") or {}
    needed = [a.get("path") for a in (pyfunc.get("artifacts") or {}).values() if isinstance(a, dict)]
    needed += [Path(pyfunc["model_code_path"]).name if pyfunc.get("model_code_path") else None, pyfunc.get("code"),
               pyfunc.get("data"), torch_flavor.get("model_data"), torch_flavor.get("code")]
    for path in filter(None, needed):
        parent, _, leaf = str(path).strip("/").rpartition("/")
        try:
            present = {Path(a.path).name for a in mlflow.artifacts.list_artifacts(
                artifact_uri=f"{uri}/{parent}" if parent else uri)}
        except Exception:
            present = set()
        if leaf not in present:
            return f"its model has no {path} in the artifact store (removed?)"
    return None


def set_champion(name: str, version: int) -> None:
    """Give version ``version`` of ``name`` the alias ``champion`` (taken from the version that had it)."""
    store.mlflow().MlflowClient().set_registered_model_alias(name, CHAMPION, str(version))
