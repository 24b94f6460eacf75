"""Refusals through the commands as a user runs them: one line, the exit code (2 for bad params), no traceback, and
nothing already written lost or overwritten: numbers the code cannot use, storage paths that are no journal file, a
torn or damaged journal, a study deleted under a worker, an LR range test that fails while writing its reports."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import optuna
import pytest

from onecycle.stages import lr_find as lr_find_mod
from onecycle.stages import train as train_mod
from onecycle.stages import tune as tune_mod
from tiny import tiny_params, write_fetched

TORN = b'{"op_code":5,"worker_id":"dead-worker","trial_id":0,"sta'


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    write_fetched(tmp_path / "data", n_train=400, n_test=50)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    return tmp_path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "mlruns" not in p.parts and p.name != "mlflow.db"}


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"onecycle {command}: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def _params(workdir: Path, **sections) -> None:
    """tiny params, with values YAML writes as a user would (``1e400`` is read as infinity)."""
    path = tiny_params(workdir, **sections)
    path.write_text(path.read_text().replace("'1e400'", "1e400").replace("'.nan'", ".nan"))


@pytest.mark.parametrize("stage, sections, key", [
    (train_mod, {"train": {"seed": 99999999999999999999999}}, "train.seed"),
    (train_mod, {"data": {"batch_size": 2**64}}, "data.batch_size"),
    (train_mod, {"schedule": {"div_factor": "1e400"}}, "schedule.div_factor"),
    (train_mod, {"optimizer": {"weight_decay": ".nan"}}, "optimizer.weight_decay"),
    (lr_find_mod, {"lr_find": {"end_lr": "1e400"}}, "lr_find.end_lr"),
    (lr_find_mod, {"lr_find": {"num_iter": 10**12}}, "lr_find.num_iter"),
    (tune_mod, {"tune": {"seed": 2**40}}, "tune.seed"),
])
def test_numbers_the_code_cannot_use_exit_2_naming_the_key_and_nothing_is_written(workdir, capsys, stage, sections,
                                                                                 key):
    reports = workdir / "reports"
    reports.mkdir()
    for name in ("lr_find.json", "lr_find.csv", "lr_find.png"):
        (reports / name).write_text(f"the previous {name}")
    _params(workdir, **sections)
    before = _files(workdir)
    assert stage.main(["--params", "params.yaml"]) == 2
    assert _one_line(capsys, stage.__name__.rsplit(".", 1)[1].replace("_", "-")).split(": error: ")[1].startswith(key)
    assert _files(workdir) == before
    assert not (workdir / "mlflow.db").exists()


def test_lr_find_that_fails_writing_its_reports_leaves_all_three_as_they_were(workdir, capsys, monkeypatch):
    _params(workdir)
    assert lr_find_mod.main(["--params", "params.yaml"]) == 0
    reports = {n: (workdir / "reports" / n).read_bytes() for n in ("lr_find.json", "lr_find.csv", "lr_find.png")}
    report = json.loads(reports["lr_find.json"])
    assert [float(line.split(",")[0]) for line in reports["lr_find.csv"].decode().splitlines()[1:]] == report["lrs"]

    def full_disk(result, chosen, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(lr_find_mod, "plot", full_disk)  # the last of the three files fails
    tiny_params(workdir, lr_find={"num_iter": 14})
    assert lr_find_mod.main(["--params", "params.yaml"]) == 1
    assert "no space left on the disk" in _one_line(capsys, "lr-find")
    assert {n: (workdir / "reports" / n).read_bytes() for n in reports} == reports  # not a new CSV beside an old JSON
    assert [p.name for p in (workdir / "reports").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("storage, says", [
    ("/dev/null", "tune.storage: /dev/null is a character device"),
    (".", "is a folder"),
    ("params.yaml", "tune.storage: params.yaml is not an Optuna journal file"),
    ("", "tune.storage is empty"),
    ("sqlite:///:memory:", "tune.storage sqlite:///:memory: is a database in memory"),
])
def test_a_storage_that_cannot_keep_the_study_exits_2_naming_tune_storage_and_the_path(workdir, capsys, storage, says):
    _params(workdir, tune={"storage": storage})
    before = _files(workdir)
    assert tune_mod.main(["--params", "params.yaml", "--n-trials", "0"]) == 2
    assert says in _one_line(capsys, "tune")
    assert _files(workdir) == before


def _journal(workdir: Path) -> Path:
    return workdir / "reports/tune/study.journal"


def _plain(path: Path):
    """The journal as `optuna studies` reads it (Optuna's own backend)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def test_tune_on_a_torn_journal_cuts_the_torn_record_keeps_a_copy_and_a_damaged_one_says_how_to_repair(workdir,
                                                                                                       capsys):
    _params(workdir, tune={"epochs": 1})
    assert tune_mod.main(["--params", "params.yaml", "--n-trials", "0"]) == 0
    journal = _journal(workdir)
    with open(journal, "ab") as f:  # a worker killed mid-append
        f.write(TORN)
    torn = journal.read_bytes()
    for _ in range(2):
        assert tune_mod.main(["--params", "params.yaml", "--n-trials", "0"]) == 0
    assert [p.read_bytes() for p in journal.parent.glob("study.journal.torn-*")] == [torn]
    assert TORN not in journal.read_bytes()
    assert [s.study_name for s in optuna.get_all_study_summaries(_plain(journal))] == ["onecycle"]

    glued = b'{"op_code":0,"worker_id":"w","study_name":"other","directions":[1]}\n'
    with open(journal, "ab") as f:  # what a worker without the guard appended onto a torn record
        f.write(TORN + glued + glued.replace(b"other", b"third"))
    damaged = journal.read_bytes()
    capsys.readouterr()
    assert tune_mod.main(["--params", "params.yaml", "--n-trials", "0"]) == 1
    line = _one_line(capsys, "tune")
    assert "study.journal (tune.storage) is damaged" in line and "onecycle tune --repair-journal" in line
    assert journal.read_bytes() == damaged
    assert tune_mod.main(["--params", "params.yaml", "--repair-journal"]) == 0
    assert "repaired" in capsys.readouterr().out
    assert [p.read_bytes() for p in journal.parent.glob("study.journal.damaged-*")] == [damaged]
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(_plain(journal)))
    assert names == ["onecycle", "other", "third"]
    assert tune_mod.main(["--params", "params.yaml", "--n-trials", "0"]) == 0


@pytest.mark.slow
def test_a_study_deleted_while_a_worker_runs_ends_it_in_one_line(workdir, capsys, monkeypatch):
    from onecycle.training.engine import train_step

    _params(workdir, tune={"epochs": 1, "n_trials": 3}, data={"val_size": 64})
    steps = []

    def deleting_the_study(*args, **kwargs):  # `optuna delete-study` from another shell, mid-trial
        steps.append(1)
        if len(steps) == 2:
            optuna.delete_study(study_name="onecycle", storage=_plain(_journal(workdir)))
        return train_step(*args, **kwargs)

    run = tune_mod.run
    monkeypatch.setattr(tune_mod, "run", lambda *a, **k: run(*a, **{**k, "step_fn": deleting_the_study}))
    assert tune_mod.main(["--params", "params.yaml"]) == 1
    line = _one_line(capsys, "tune")
    assert "study onecycle was deleted from reports/tune/study.journal while this worker ran" in line
    assert "Record does not exist" not in line
    assert optuna.get_all_study_summaries(_plain(_journal(workdir))) == []



def test_the_next_write_removes_what_a_writer_killed_mid_write_left(tmp_path):
    import subprocess
    import sys

    from onecycle.core.files import atomic_write_text, written_together

    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "metrics.json").write_text("the previous metrics")
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys, tempfile\n"
        "from pathlib import Path\n"
        "from onecycle.core.files import _temp_prefix\n"
        f"folder = Path({str(reports)!r})\n"
        "tempfile.mkstemp(prefix=_temp_prefix(folder, 'metrics.json'), dir=folder)\n"
        "tempfile.mkdtemp(prefix=_temp_prefix(folder, 'lr_find'), dir=folder)\n"
        "os.kill(os.getpid(), 9)\n")])
    assert killed.returncode == -9
    left = sorted(p.name for p in reports.iterdir() if p.name.startswith("."))
    assert len(left) == 2 and (reports / "metrics.json").read_text() == "the previous metrics"
    atomic_write_text(reports / "metrics.json", "new")
    with written_together(reports / "lr_find.json") as staged:
        staged[reports / "lr_find.json"].write_text("{}")
    assert sorted(p.name for p in reports.iterdir()) == ["lr_find.json", "metrics.json"]


@pytest.mark.parametrize("make, says", [
    (lambda d: d.joinpath("p.yaml").write_bytes(b"\xff\xfe\x00\x01\x02binary") and d / "p.yaml", "p.yaml "),
    (lambda d: d.joinpath("p.yaml").write_bytes(b"train:\n  epochs: \x80\n") and d / "p.yaml", "is not valid YAML"),
    (lambda d: d.joinpath("p.yaml").write_bytes(b"- a\n- b\n") and d / "p.yaml", "holds no params"),
    (lambda d: d.joinpath("p.yaml").write_bytes(b"#" * (17 * 2**20)) and d / "p.yaml", "larger than 16 MiB"),
    (lambda d: d, "is not a file"),
    (lambda d: Path("/dev/zero"), "/dev/zero is not a file"),
])
def test_a_params_file_of_any_encoding_or_file_type_is_one_line(workdir, capsys, make, says):
    assert train_mod.main(["--params", str(make(workdir))]) == 2
    assert says in _one_line(capsys, "train")


def test_a_utf16_params_file_with_its_byte_order_mark_is_read(workdir):
    from onecycle.config import load_params

    (workdir / "p.yaml").write_bytes("train:\n  epochs: 3\n".encode("utf-16"))
    assert load_params(workdir / "p.yaml").train.epochs == 3
