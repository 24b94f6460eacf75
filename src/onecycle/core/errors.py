"""Errors a user can act on. The CLI prints their message as one line and exits with ``exit_code``."""


class OneCycleError(RuntimeError):
    """A problem the user can fix; the message says what is wrong and what to do."""

    exit_code = 1


class ConfigError(OneCycleError, ValueError):
    """A params file that cannot be used; the message is one line naming the dotted key."""

    exit_code = 2


class DatasetError(OneCycleError):
    """A dataset that cannot be fetched or loaded."""
