"""Errors a user can act on. The CLI prints their message as one line and exits with ``exit_code``."""

import errno

# a write refused for space: the disk (or the quota) is full, or the file size limit (``ulimit -f``) is reached
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_space_message(path, exc: OSError) -> str:
    """One line for a write that ran out of space: which file, and whether the disk or the size limit is full."""
    where = path if path else "a file (its name unknown)"
    if exc.errno == errno.EFBIG:
        return f"file size limit reached writing {where} ({exc.strerror}; see `ulimit -f`)"
    return f"no space left on the disk writing {where} ({exc.strerror}); free some space and run again"


class OneCycleError(RuntimeError):
    """A problem the user can fix; the message says what is wrong and what to do."""

    exit_code = 1


class ConfigError(OneCycleError, ValueError):
    """A params file that cannot be used; the message is one line naming the dotted key."""

    exit_code = 2


class DatasetError(OneCycleError):
    """A dataset that cannot be fetched or loaded."""
