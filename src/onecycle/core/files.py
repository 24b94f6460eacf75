"""Atomic file writes: every output is written to a temporary file in its folder and renamed into place,
so a crash leaves the old file or the new one, never half of one. A temporary file names its process (pid and
host), so the next write of the same file removes what a killed writer left (:func:`_temp_prefix`)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _temp_prefix(folder: Path, name: str) -> str:
    """``.<name>.<pid>-<host>.``: the prefix of this process's temporary files for ``name``; those that a process of
    this host that is gone left in ``folder`` (a ``kill -9`` mid-write) are removed first."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            found = re.fullmatch(rf"\.{re.escape(name)}\.(\d+)-{host}\..+", entry.name)
            if not found or int(found[1]) == os.getpid() or _alive(int(found[1])):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return f".{name}.{os.getpid()}-{host}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: str, path: Path, mode: int | None) -> None:
    # mkstemp makes files 0600; outputs are ordinary files unless the caller keeps a file's own mode
    os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
    os.replace(tmp, path)


def _name_the_target(exc: BaseException, path: Path, tmp: str) -> None:
    """A write error (a full disk...) names the file being written, not its temporary name or nothing."""
    if isinstance(exc, OSError) and exc.filename in (None, tmp):
        exc.filename = str(path)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` atomically (fsynced); ``mode`` = permissions, default as a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.parent, path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path, mode)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _name_the_target(exc, path, tmp)
        raise


@contextlib.contextmanager
def written_together(*paths: Path) -> Iterator[dict[Path, Path]]:
    """``{path: where to write it}``: files of the same names in a temporary folder beside the first path; when the
    block ends without an error they replace ``paths`` (each atomically), else they are removed, so a writer that
    fails leaves every one of ``paths`` as it was (never a new CSV beside an old JSON)."""
    paths = tuple(Path(p) for p in paths)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=_temp_prefix(paths[0].parent, paths[0].stem), dir=paths[0].parent))
    try:
        staged = {path: folder / path.name for path in paths}
        yield staged
        for path, tmp in staged.items():
            if tmp.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_figure(fig, path: Path, **savefig_kwargs) -> None:
    """Save a matplotlib figure to ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.parent, path.stem), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, **savefig_kwargs)
        _replace(tmp, path, None)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _name_the_target(exc, path, tmp)
        raise
    finally:
        plt.close(fig)
