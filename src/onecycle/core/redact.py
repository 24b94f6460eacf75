"""One place decides what a credential looks like and hides it: MLflow params, log records, error lines.

A URL's password (``scheme://user:SECRET@host``) becomes ``***``, and so does the value of a query or
``key=value`` token whose key names a secret (``password=``, ``token=``, ``secret=``, ``api_key=``, S3's
``aws_secret_access_key=``/``aws_access_key_id=`` and a presigned URL's signature ...), and an AWS access key id.
Everything that leaves the process for people or stores (the MLflow store, reports, log lines, the CLI's
one-line errors) goes through :func:`redact`; nothing else masks on its own.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

# scheme://user:password@  (the user may be empty; the password is everything up to the last @ before the host)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s?#]*:)(?P<secret>[^@\s/]*)(?P<at>@)")
# password=..., ?token=..., &api_key=..., "secret": stays readable up to the next separator
# (S3: aws_secret_access_key=, secret_access_key =, X-Amz-Signature= / X-Amz-Credential= of a presigned URL)
_KEY_VALUE = re.compile(r"(?P<head>(?<![A-Za-z0-9])(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key"
                        r"|secret[_-]?key|access[_-]?key[_-]?id|signature|credential)\s*[=:]\s*)"
                        r"(?P<secret>[^&\s;,'\"]+)", re.IGNORECASE)
# an AWS access key id anywhere (AKIA... long-term, ASIA... temporary): names the account's key
_AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")


def redact(value: Any) -> Any:
    """``value`` with credentials masked; strings are scanned, lists/dicts recursively, other values unchanged."""
    if isinstance(value, str):
        if "://" not in value and "=" not in value and ":" not in value and "AKIA" not in value and "ASIA" not in value:
            return value
        value = _URL_PASSWORD.sub(lambda m: m["head"] + (MASK if m["secret"] else "") + m["at"], value)
        return _AWS_KEY_ID.sub(MASK, _KEY_VALUE.sub(lambda m: m["head"] + MASK, value))
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that masks credentials in a record's final message (its args included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error handling
            return True
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def install_log_filter() -> None:
    """Mask credentials in every record that reaches the root logger's handlers (idempotent)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def one_line(exc: BaseException) -> str:
    """The error as one line, credentials masked."""
    return redact(" ".join(str(exc).split()))
