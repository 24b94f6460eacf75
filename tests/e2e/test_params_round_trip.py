"""`dvc exp run -S key=value` keeps params.yaml as written: the real DVC rewrites the repository's real params.yaml
(ruamel.yaml's round trip, lists and nulls as DVC writes them), and only the line of the key it sets changes.

A tiny DVC repository holds the project's params.yaml and one trivial stage that depends on every section.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from onecycle.config import load_params

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("git") is None, reason="needs git")]

SECTIONS = ["data", "augment", "model", "optimizer", "lr_find", "schedule", "train", "mlflow", "evaluate", "tune"]


def _run(cmd, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("params") / "repo"
    repo.mkdir()
    shutil.copyfile(REPO / "params.yaml", repo / "params.yaml")  # the real file, as users edit it
    (repo / "dvc.yaml").write_text(
        "stages:\n  read:\n"
        f"    cmd: {sys.executable} -c pass\n"
        f"    params: [{', '.join(SECTIONS)}]\n")
    _run(["git", "init", "-q"], repo)
    _run([BIN / "dvc", "init", "-q"], repo)
    _run([BIN / "dvc", "config", "core.analytics", "false"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "params"], repo)
    return repo


# -S arguments -> the lines of params.yaml that must change (old line -> new line), and nothing else
CASES = {
    ("train.epochs=5",): {"  epochs: 4": "  epochs: 5"},
    ("data.train_subset=4096",): {  # null (written empty) -> a number: the comment stays in its column
        "  train_subset:               # empty = all training examples":
        "  train_subset: 4096          # empty = all training examples"},
    ("optimizer.betas=[0.9,0.99]",): {"  - 0.999": "  - 0.99"},
    ("optimizer.no_decay_norm_bias=false", "lr_find.start_lr=1e-7"): {
        "  no_decay_norm_bias: true     # no weight decay on BatchNorm weights and biases":
        "  no_decay_norm_bias: false    # no weight decay on BatchNorm weights and biases",
        "  start_lr: 0.001             # the default model's loss is flat below 1e-3 (Adam: start at 1.0e-07)":
        "  start_lr: 1e-07             # the default model's loss is flat below 1e-3 (Adam: start at 1.0e-07)"},
    ("data.val_size=0.1", "mlflow.registered_model=null"): {
        "  val_size: auto              #": "  val_size: 0.1               #",
        "  registered_model: auto      #": "  registered_model:           #"},
}


def _changed(before: list[str], after: list[str]) -> dict[str, str]:
    assert len(after) == len(before), "\n".join(after)
    return {a: b for a, b in zip(before, after, strict=True) if a != b}


@pytest.mark.parametrize("sets", list(CASES), ids=[" ".join(c) for c in CASES])
def test_dvc_exp_run_set_changes_only_the_line_of_its_key(repo, sets):
    original = (REPO / "params.yaml").read_text()
    (repo / "params.yaml").write_text(original)
    _run([BIN / "dvc", "exp", "run", "-q", *[a for s in sets for a in ("-S", s)]], repo)
    written = (repo / "params.yaml").read_text()
    changed = _changed(original.splitlines(), written.splitlines())
    expected = CASES[sets]
    # a long comment is matched by its start: the expected line and the written one agree up to the comment mark
    assert len(changed) == len(expected), changed
    for old, new in expected.items():
        (got_old,) = [line for line in changed if line.startswith(old)]
        assert changed[got_old].startswith(new), (got_old, changed[got_old])
        assert changed[got_old][len(new):] == got_old[len(old):]  # the rest of the line (its comment) unchanged
    load_params(repo / "params.yaml")  # and what DVC wrote loads


def test_the_repository_params_yaml_is_already_in_the_form_dvc_writes(repo):
    """A -S that sets a key to its own value writes the file back byte for byte."""
    original = (REPO / "params.yaml").read_text()
    (repo / "params.yaml").write_text(original)
    _run([BIN / "dvc", "exp", "run", "-q", "-S", "train.epochs=4", "-S", "optimizer.betas=[0.9,0.999]",
          "-S", "data.source=null", "-S", "augment.train=[]"], repo)
    assert (repo / "params.yaml").read_text() == original
