"""The journal file, tune's default Optuna storage: opened only when it is one, its torn last record cut off before
anything is appended, and a damaged one repaired on request (``onecycle tune --repair-journal``).

Optuna appends each record as one JSON line under the journal's lock. A worker killed in the middle of that write,
or a full disk, leaves a last line without its newline: a torn record. Optuna's readers skip it while it is last,
but the next append would be glued onto it, and from then on every reader of the file fails (``JSONDecodeError``,
``AssertionError: Should not reach``). So:

* :class:`GuardedJournalBackend` cuts a torn last line off before each append, under the same lock (so it is never
  a write in progress), and keeps the file as it was beside it (``<journal>.torn-<time>``): nothing a reader has
  seen is lost, since readers skip a torn last line.
* :func:`check_file` refuses, in one line naming the key and the path, what is no journal file (a folder, a device
  such as ``/dev/null``, a pipe, an unwritable path, a file of other content) and a journal damaged *before* its
  last line (records glued onto a torn one), which :func:`repair` mends: it keeps every complete record (a record
  glued after a torn fragment included), drops the fragments, and keeps the file as it was (``<journal>.damaged-<time>``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from onecycle.core.errors import ConfigError, OneCycleError

log = logging.getLogger(__name__)

_RECORD_START = b'{"op_code"'  # every record Optuna writes begins so (json.dumps of {"op_code": ..., ...})
_KINDS = {stat.S_ISDIR: "a folder", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
          stat.S_ISFIFO: "a named pipe", stat.S_ISSOCK: "a socket"}


def _is_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False
    return isinstance(record, dict) and "op_code" in record


@dataclass
class Scan:
    """What a journal file holds: complete records, damaged lines (their 1-based numbers), a torn last line."""

    records: int
    damaged: list[int]
    torn: bool
    foreign: bool  # no record at all, and something that is none: another file's content



def scan(data: bytes) -> Scan:
    """Read a journal file's bytes: which complete lines are records, and whether the last line is torn."""
    *lines, tail = data.split(b"\n")
    damaged = [i for i, line in enumerate(lines, 1) if line.strip() and not _is_record(line)]
    records = sum(bool(line.strip()) for line in lines) - len(damaged)
    foreign = records == 0 and bool(damaged or (tail and not tail.startswith(_RECORD_START)))
    return Scan(records=records, damaged=damaged, torn=bool(tail), foreign=foreign)


def check_file(path: Path, key: str = "tune.storage", damaged_ok: bool = False) -> None:
    """Refuse in one line (ConfigError naming ``key`` and ``path``) a path that is not a usable journal file: not a
    regular file, not readable and writable (nor creatable), a file of other content, or a journal damaged before its
    last line (OneCycleError: how to repair it; ``damaged_ok``: not refused, for :func:`repair`)."""
    path = Path(path)
    try:
        st = path.stat()  # through symlinks: what is written is the target
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot use {path} as the journal file: {exc.strerror or exc}") from None
    if st is None:
        folder = next((p for p in path.parents if p.exists()), Path("."))
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: cannot create the journal file {path}: {folder} is not a folder this user can "
                              "write to")
        return
    kind = next((what for test, what in _KINDS.items() if test(st.st_mode)), None)
    if kind is not None or not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{key}: {path} is {kind or 'not a regular file'}, not a journal file: a study written there "
                          "would be lost; name a file (or leave tune.storage null for reports/tune/study.journal)")
    if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: the journal file {path} (or its folder, which holds its lock file) cannot be read "
                          "and written by this user")
    found = scan(path.read_bytes())
    if found.foreign:
        raise ConfigError(f"{key}: {path} is not an Optuna journal file (it holds no journal record); name a new "
                          "file, or leave tune.storage null for reports/tune/study.journal")
    if found.damaged and not damaged_ok:
        raise OneCycleError(f"the journal file {path} ({key}) is damaged: line {found.damaged[0]} is no complete record "
                            f"({len(found.damaged)} such line(s): a worker killed while writing, or a full disk); stop "
                            "every worker on it and run `onecycle tune --repair-journal` (it keeps a copy of the file)")


def _backup(path: Path, why: str) -> Path:
    """Copy ``path`` to ``<path>.<why>-<time>`` beside it (a name not taken yet); returns the copy."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for n in range(1000):
        copy = path.with_name(f"{path.name}.{why}-{stamp}{f'-{n}' if n else ''}")
        if not copy.exists():
            shutil.copy2(path, copy)
            return copy
    raise OneCycleError(f"cannot find a free name for a copy of {path}")


def cut_torn_tail(path: Path) -> Path | None:
    """Cut a torn last line off ``path`` (the caller holds the journal's lock); returns the copy of the file as it
    was, or None when its last line was whole."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return None
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None
        keep = size
        while keep > 0:  # back to the end of the last whole line
            start = max(0, keep - 65536)
            f.seek(start)
            block = f.read(keep - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            keep = start
        copy = _backup(path, "torn")
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s ended in a torn record (a worker killed while writing it, or a full disk): cut off before "
                "appending; the file as it was is kept as %s", path, copy)
    return copy


@functools.cache
def _backend_class():
    from optuna.storages.journal import JournalFileBackend

    class GuardedJournalBackend(JournalFileBackend):
        """Optuna's journal file whose appends first cut a torn last line off (:func:`cut_torn_tail`), under the lock."""

        def append_logs(self, logs: list[dict]) -> None:
            text = "\n".join(json.dumps(record, separators=(",", ":")) for record in logs) + "\n"
            self._lock.acquire()
            try:
                cut_torn_tail(Path(self._file_path))
                with open(self._file_path, "ab") as f:  # as JournalFileBackend.append_logs writes
                    f.write(text.encode("utf-8"))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:  # a full disk: one line naming the file; the torn tail is cut next time
                exc.filename = exc.filename or self._file_path
                raise
            finally:
                self._lock.release()

    return GuardedJournalBackend


def open_backend(path: Path):
    """The journal file ``path`` as an Optuna backend that never appends onto a torn record (O_EXCL lock file)."""
    from optuna.storages.journal import JournalFileOpenLock

    # The open(O_EXCL) lock: works on Linux, macOS and Windows (the symlink lock needs a privilege there) and on
    # NFSv3+; it shares the lock file with optuna-dashboard's.
    return _backend_class()(str(path), lock_obj=JournalFileOpenLock(str(path)))


def repair(path: Path, key: str = "tune.storage") -> str:
    """Mend a damaged or torn journal file in place (under its lock); returns one line saying what was done.

    Every complete record is kept, a record glued onto a torn fragment included; the fragments are dropped; the file
    as it was is kept beside it. The result is then read back through Optuna.
    """
    from optuna.storages.journal import JournalFileOpenLock

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: there is no journal file {path} to repair")
    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        found = scan(data)
        if not found.damaged and not found.torn:
            return f"{path} is whole ({found.records} records): nothing to repair"
        if found.foreign:
            raise ConfigError(f"{key}: {path} is not an Optuna journal file; nothing repaired")
        *lines, _torn = data.split(b"\n")
        kept, dropped = [], 0
        for line in lines:
            if _is_record(line):
                kept.append(line)
                continue
            start = line.rfind(_RECORD_START)
            if start > 0 and _is_record(line[start:]):  # a whole record written after a torn one
                kept.append(line[start:])
            dropped += bool(line.strip())
        copy = _backup(path, "damaged")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.repair")
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    finally:
        lock.release()
    _replay(path, key)
    return (f"repaired {path}: kept {len(kept)} records, dropped {dropped} damaged line(s)"
            f"{' and a torn last line' if found.torn else ''}; the file as it was is kept as {copy}")


def _replay(path: Path, key: str) -> None:
    """Read ``path`` through Optuna, as every worker will; one line if it cannot."""
    import optuna

    try:
        optuna.storages.JournalStorage(open_backend(path)).get_all_studies()
    except Exception as exc:
        raise OneCycleError(f"{key}: {path} still cannot be read by Optuna after the repair "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
