"""One place decides what a credential looks like and hides it: MLflow params, log records, error lines.

A URL's password (``scheme://user:SECRET@host``) becomes ``***``, and so does the value of a query or
``key=value`` / ``"key": "value"`` token whose key names a secret (``password=``, ``sslpassword=``, ``token=``,
``secret=``, ``api_key=``, S3's ``aws_secret_access_key=``/``aws_access_key_id=`` and a presigned URL's
signature ...), a mapping's value under such a key, and an AWS access key id. Everything that leaves the
process for people or stores (the MLflow store, reports, log lines, the CLI's one-line errors) goes through
:func:`redact`; nothing else masks on its own.

A URL's userinfo is split by hand rather than by a regex or :func:`urllib.parse.urlsplit`: a password may hold
any character but whitespace (``/``, ``@``, ``?``, ``#``, ``:`` unescaped, as SQLAlchemy accepts them), and
urlsplit ends the host at the password's first ``/``. The password is everything between the first ``:`` after
``scheme://user`` and the *last* ``@`` of the URL's whitespace-delimited token, so an odd password is never
shown; the price is that an ``@`` later in the same token (in a query) hides the host too.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

# scheme://user:  -- the userinfo's password starts after it; the user may be empty and holds no ":/@?#"
_URL_USER = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s?#]*:")
_TOKEN_END = re.compile(r"\S*")  # a URL runs to the next whitespace
# the words that make a key a secret's name, at the end of the key: password=, sslpassword=, PGPASSWORD=,
# AWS_SESSION_TOKEN=, X-Amz-Signature= / X-Amz-Credential= of a presigned URL, aws_secret_access_key = ...
_SECRET_WORDS = (r"(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|secret[_-]?key"
                 r"|access[_-]?key[_-]?id|signature|credential)")
_SECRET_KEY = re.compile(r"[A-Za-z0-9_.\-]*" + _SECRET_WORDS, re.IGNORECASE)
# key=value, key: value, "key": "quoted value", 'key'='value'; an unquoted value runs to the next separator
_KEY_VALUE = re.compile(r"(?P<head>(?<![A-Za-z0-9_.\-])" + _SECRET_KEY.pattern + r"(?P<q1>[\"']?)\s*[=:]\s*)"
                        r"(?:(?P<quote>[\"'])(?P<quoted>(?:\\.|(?!(?P=quote)).)*)(?P=quote)"
                        r"|(?P<secret>[^&\s;,'\"}\]]+))", re.IGNORECASE)
# an AWS access key id anywhere (AKIA... long-term, ASIA... temporary): names the account's key
_AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")


def _mask_url_passwords(text: str) -> str:
    out, pos = [], 0
    while (m := _URL_USER.search(text, pos)) is not None:
        start = m.end()  # the password's first character
        end = _TOKEN_END.match(text, start).end()
        at = text.rfind("@", start, end)  # the last @ of the token ends the userinfo
        if at < 0:  # no userinfo (http://host:8080/path): nothing to hide here
            out.append(text[pos:start])
            pos = start
            continue
        out.append(text[pos:start] + (MASK if at > start else "") + "@")
        pos = at + 1
    out.append(text[pos:])
    return "".join(out)


def _mask_key_value(m: re.Match) -> str:
    if m["quote"] is not None:
        return m["head"] + m["quote"] + MASK + m["quote"]
    return m["head"] + MASK


def is_secret_key(key: str) -> bool:
    """Whether a mapping key or params name (``password``, ``db.sslpassword``, ``AWS_SESSION_TOKEN``) names a secret."""
    return bool(_SECRET_KEY.fullmatch(key))


def redact(value: Any) -> Any:
    """``value`` with credentials masked; strings are scanned, lists/dicts recursively, other values unchanged.

    A mapping's value under a key that names a secret (:func:`is_secret_key`) is masked whole.
    """
    if isinstance(value, str):
        if "://" not in value and "=" not in value and ":" not in value and "AKIA" not in value and "ASIA" not in value:
            return value
        value = _mask_url_passwords(value)
        return _AWS_KEY_ID.sub(MASK, _KEY_VALUE.sub(_mask_key_value, value))
    if isinstance(value, dict):
        return {k: (MASK if isinstance(k, str) and is_secret_key(k) and v not in (None, "") else redact(v))
                for k, v in value.items()}
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
