"""The journal file as tune opens it: a torn last record is cut off (a copy kept) before anything is appended, a
damaged file is refused in one line and mended by repair, and whatever is not a journal file is refused naming
tune.storage and the path, before anything is written to it."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest

from onecycle.core.errors import ConfigError, OneCycleError
from onecycle.tuning import journal
from onecycle.tuning.studies import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
TORN = b'{"op_code":5,"worker_id":"dead-worker","trial_id":0,"sta'


def _study_with_trials(path: Path, n: int = 2) -> None:
    storage, _ = open_storage(str(path), path)
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n)


def _plain_optuna(path: Path):
    """The file as `optuna studies` and optuna-dashboard read it: Optuna's own backend."""
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def test_a_torn_last_record_is_cut_off_before_the_next_append_and_the_file_kept(tmp_path):
    path = tmp_path / "study.journal"
    _study_with_trials(path)
    with open(path, "ab") as f:  # a worker killed in the middle of its append
        f.write(TORN)
    before = path.read_bytes()

    storage, _ = open_storage(str(path), path)
    study = optuna.load_study(study_name="s", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    optuna.create_study(storage=storage, study_name="another")

    assert TORN not in path.read_bytes() and path.read_bytes().endswith(b"\n")
    copies = list(tmp_path.glob("study.journal.torn-*"))
    assert [c.read_bytes() for c in copies] == [before]  # the file as it was, beside it
    plain = _plain_optuna(path)  # every reader: no JSONDecodeError, no "Should not reach"
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(plain)) == ["another", "s"]
    assert [t.state.name for t in optuna.load_study(study_name="s", storage=plain).trials] == ["COMPLETE"] * 4


def test_a_journal_damaged_before_its_end_is_refused_in_one_line_and_repair_mends_it(tmp_path):
    path = tmp_path / "study.journal"
    _study_with_trials(path)
    glued = b'{"op_code":0,"worker_id":"w","study_name":"glued","directions":[1]}\n'
    with open(path, "ab") as f:  # what an unguarded append did: a record glued onto the torn one, then more
        f.write(TORN + glued + b'{"op_code":0,"worker_id":"w","study_name":"after","directions":[1]}\n')
    damaged = path.read_bytes()
    with pytest.raises(OneCycleError, match=r"study.journal \(tune.storage\) is damaged: line \d+ .*--repair-journal"):
        open_storage(str(path), path)
    assert path.read_bytes() == damaged  # nothing appended

    message = journal.repair(path)
    assert "dropped 1 damaged line" in message and "damaged-" in message
    assert [c.read_bytes() for c in tmp_path.glob("study.journal.damaged-*")] == [damaged]
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(_plain_optuna(path)))
    assert names == ["after", "glued", "s"]  # the whole records are kept, the torn fragment dropped
    storage, _ = open_storage(str(path), path)
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 2
    assert journal.repair(path).endswith("nothing to repair")


@pytest.mark.parametrize("make, message", [
    (lambda tmp: "/dev/null", "/dev/null is a character device"),
    (lambda tmp: str(tmp), "is a folder"),
    (lambda tmp: str(tmp / "link"), "is a character device"),
    (lambda tmp: str(tmp / "fifo"), "is a named pipe"),
    (lambda tmp: str(tmp / "params.yaml"), "is not an Optuna journal file"),
    (lambda tmp: str(tmp / "notes.txt"), "is not an Optuna journal file"),
    (lambda tmp: str(tmp / "params.yaml" / "study.journal"), "params.yaml"),
])
def test_a_path_that_is_no_journal_file_is_refused_naming_the_key_and_nothing_is_written(tmp_path, make, message):
    (tmp_path / "link").symlink_to("/dev/null")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 2\n")
    (tmp_path / "notes.txt").write_text("a line without its newline")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="^tune.storage: .*" + message) as err:
        open_storage(make(tmp_path), tmp_path / "default.journal")
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link", "notes.txt", "params.yaml"]


@pytest.mark.parametrize("url, message", [
    ("", "is empty"), ("  ", "is empty"), ("sqlite://", "in memory"), ("sqlite:///:memory:", "in memory"),
    (":memory:", "in memory"), ("postgresql:/db", "without '//'"),
])
def test_a_storage_string_that_cannot_keep_a_study_is_refused_from_params_and_from_the_environment(url, message):
    from onecycle.config import parse_params

    with pytest.raises(ConfigError, match="^tune.storage .*" + message):
        parse_params({"tune": {"storage": url}})
    with pytest.raises(ConfigError, match="^OPTUNA_STORAGE .*" + message):
        open_storage(url, Path("unused.journal"), key="OPTUNA_STORAGE")


def test_a_write_cut_by_the_file_size_limit_is_one_error_naming_the_journal_and_the_next_worker_goes_on(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "study.journal"
    _study_with_trials(path, n=1)
    size = path.stat().st_size
    script = (  # a worker whose append hits the file size limit (as a full disk would) in the middle of a record
        "import resource, signal, sys, optuna\n"
        "from pathlib import Path\n"
        "from onecycle.tuning.studies import open_storage\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"storage, _ = open_storage({str(path)!r}, Path('unused'))\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size} + 20, {size} + 20))\n"
        "try:\n"
        "    optuna.create_study(storage=storage, study_name='x' * 200)\n"
        "except OSError as exc:\n"
        "    print(exc.filename, exc.errno)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == [str(path), "27"], out.stderr  # EFBIG, naming the journal
    assert path.stat().st_size == size + 20 and not path.read_bytes().endswith(b"\n")  # a torn record

    storage, _ = open_storage(str(path), path)
    optuna.create_study(storage=storage, study_name="next")
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(_plain_optuna(path))) == ["next", "s"]
    assert len(list(tmp_path.glob("study.journal.torn-*"))) == 1
