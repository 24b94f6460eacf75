"""The model registry's side of a trained model: the aliases (``candidate``, ``champion``), the tags a
version carries after ``evaluate`` (its test metrics, the test split's digest, git commit, DVC experiment),
and the digest that says two versions were tested on the same data. ``onecycle promote`` reads them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from onecycle.tracking import store

CANDIDATE, CHAMPION = "candidate", "champion"  # registered-model aliases
TOP1, TOP5, DIGEST = "test/top1", "test/top5", "test/dataset_digest"  # model-version tags


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
