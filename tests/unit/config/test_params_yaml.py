"""params.yaml is read one way everywhere: YAML 1.2, as DVC (ruamel.yaml) writes it.

`dvc exp run -S lr_find.start_lr=1e-7` writes ``1e-07``: a float in YAML 1.2, a string to a YAML 1.1 reader
(PyYAML). A tiny DVC repository whose one stage reads its params through onecycle shows the types a stage sees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from onecycle.config import load_params, read_yaml
from onecycle.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent

PROBE = """\
import json
from onecycle.config import load_params, read_yaml

raw = read_yaml("params.yaml")
params = load_params("params.yaml")
keys = [("lr_find", "start_lr"), ("lr_find", "end_lr"), ("train", "grad_clip"), ("schedule", "max_lr")]
seen = {f"{s}.{k}": [type(raw[s][k]).__name__, type(getattr(getattr(params, s), k)).__name__] for s, k in keys}
seen["params.flat"] = {k: type(v).__name__ for k, v in params.flat().items() if k in seen}
json.dump(seen, open("types.json", "w"))
"""


def _run(cmd, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dvc_exp_run_set_exponents_reach_the_stages_as_numbers(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copyfile(REPO / "params.yaml", repo / "params.yaml")  # the real file, as users edit it
    (repo / "probe.py").write_text(PROBE)
    (repo / "dvc.yaml").write_text(
        "stages:\n  probe:\n"
        f"    cmd: {sys.executable} probe.py\n"
        "    deps: [probe.py]\n"
        "    params: [lr_find.start_lr, lr_find.end_lr, train.grad_clip, schedule.max_lr]\n"
        "    outs:\n      - types.json:\n          cache: false\n")
    _run(["git", "init", "-q"], repo)
    _run([BIN / "dvc", "init", "-q"], repo)
    _run([BIN / "dvc", "config", "core.analytics", "false"], repo)
    (repo / ".gitignore").write_text("types.json\n")
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "tiny"], repo)

    _run([BIN / "dvc", "exp", "run", "-q", "-S", "lr_find.start_lr=1e-7", "-S", "lr_find.end_lr=1E+1",
          "-S", "train.grad_clip=5e-1", "-S", "schedule.max_lr=2e-1"], repo)

    written = (repo / "params.yaml").read_text()
    assert "start_lr: 1e-07" in written  # what DVC writes: a float in YAML 1.2, a string in YAML 1.1
    seen = json.loads((repo / "types.json").read_text())
    assert seen == {
        "lr_find.start_lr": ["float", "float"], "lr_find.end_lr": ["float", "float"],
        "train.grad_clip": ["float", "float"], "schedule.max_lr": ["float", "float"],
        "params.flat": {"lr_find.start_lr": "float", "lr_find.end_lr": "float", "train.grad_clip": "float",
                        "schedule.max_lr": "float"}}
    params = load_params(repo / "params.yaml")
    assert (params.lr_find.start_lr, params.lr_find.end_lr, params.schedule.max_lr) == (1e-7, 10.0, 0.2)


def test_the_reader_is_yaml_1_2(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("a: 1e-07\nb: on\nc: 1.0e-3\nd: ~\n")
    assert read_yaml(path) == {"a": 1e-07, "b": "on", "c": 1e-3, "d": None}  # YAML 1.1 reads a as a string, b as True


def test_a_duplicate_key_and_broken_yaml_are_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("schedule:\n  max_lr: 0.1\n  pct_start: 0.3\n  max_lr: 0.2\n")
    with pytest.raises(ConfigError, match=rf"^{path} is not valid YAML at line 4: duplicate key 'max_lr'$"):
        load_params(path)
    path.write_text("a: !!python/object:os.system x\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line 1: could not determine a constructor"):
        load_params(path)
