"""Structured logs from the stdlib ``logging`` module.

Code logs a fixed message and puts the variable parts in ``extra``::

    logger.info("agent attested", extra={"agent_id": agent_id, "attestor": "join_token"})

and :func:`configure_logging` installs one handler on the root logger that prints every record as
one line, either a JSON object (``fmt="json"``, for log pipelines) or ``key=value`` text
(``fmt="text"``, for people). Either way a hostile value cannot forge a line: JSON escapes control
characters, and the text format quotes and escapes every value that is not a plain word.

Fields named like secrets (``key``, ``private_key``, ``join_token``, ``password``, ...) are never
printed: the handler's :class:`RedactSecrets` filter replaces their values with ``[redacted]``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Final, Literal, TextIO

__all__ = [
    "REDACTED",
    "JSONFormatter",
    "RedactSecrets",
    "TextFormatter",
    "configure_logging",
    "is_secret_field",
    "parse_level",
    "redact",
]

REDACTED: Final = "[redacted]"

_LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_KNOWN_LEVELS: Final = "debug, info, warning, error, critical"

# The attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRIBUTES: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}

# A field is secret when its name, or its last ``_``/``-``/``.``-separated part, is one of these.
_SECRET_WORDS: Final = frozenset(
    {"key", "token", "password", "passwd", "passphrase", "secret", "credential", "credentials"}
)
_NAME_PARTS: Final = re.compile(r"[_.\-]")

# Keys the JSON formatter writes itself; an extra field with one of these names is renamed.
_JSON_RESERVED: Final = frozenset({"time", "level", "logger", "msg", "error", "traceback", "stack"})

# One encoder for every record: ``json.dumps`` with options builds a new one per call.
_JSON: Final = json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=str)

_TEXT_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_.\-]+")
_ESCAPES: Final[Mapping[str, str]] = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def parse_level(name: str) -> int:
    """The ``logging`` level for a level name, case-insensitive (``"info"``, ``"DEBUG"``, ...)."""
    level = _LEVELS.get(name.strip().lower())
    if level is None:
        raise ValueError(f"logs: unknown log level {json.dumps(name)} (known: {_KNOWN_LEVELS})")
    return level


@functools.lru_cache(maxsize=1024)  # a program logs a few dozen field names, over and over
def is_secret_field(name: str) -> bool:
    """Whether a field of this name holds a secret and must never be printed.

    ``key``, ``private_key``, ``join_token``, ``db_password``, ``client-secret`` are secrets;
    ``key_id``, ``token_ttl`` and ``keys_loaded`` are not.
    """
    parts = _NAME_PARTS.split(name.lower())
    return parts[-1] in _SECRET_WORDS


def redact(fields: Mapping[str, object]) -> dict[str, object]:
    """A copy of ``fields`` with the values of secret fields replaced by ``[redacted]``."""
    return {name: REDACTED if is_secret_field(name) else value for name, value in fields.items()}


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The fields a record got from ``extra``: its attributes that are not LogRecord's own."""
    return {name: value for name, value in vars(record).items() if name not in _STANDARD_ATTRIBUTES}


class RedactSecrets(logging.Filter):
    """Replaces the value of every secret ``extra`` field of a record with ``[redacted]``.

    Installed on the handler (not a logger), so it sees records propagated from every logger. It
    edits the record in place: a secret leaves no handler behind this one either.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for name in extra_fields(record):
            if is_secret_field(name):
                setattr(record, name, REDACTED)
        return True


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _timestamp(record: logging.LogRecord) -> str:
    # Formatted once per second, not once per record: a busy proxy logs every connection.
    second = int(record.created // 1)
    micros = round((record.created - second) * 1_000_000)  # as datetime.fromtimestamp rounds
    if micros >= 1_000_000:
        second, micros = second + 1, 0
    return f"{_second(second)}.{micros // 1000:03d}Z"


def _error(record: logging.LogRecord) -> str | None:
    if not record.exc_info or record.exc_info[1] is None:
        return None
    exc = record.exc_info[1]
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _traceback(record: logging.LogRecord) -> str | None:
    if not record.exc_info or record.exc_info[1] is None:
        return None
    if not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    return record.exc_text


class JSONFormatter(logging.Formatter):
    """One JSON object per line.

    ``time`` (RFC 3339, UTC, milliseconds), ``level`` (lower case), ``logger``, ``msg``, then every
    ``extra`` field, then ``error`` (``"Type: message"``) and ``traceback`` when the record carries
    an exception, and ``stack`` for ``stack_info``. An extra field named like one of those gets an
    ``extra_`` prefix rather than overwrite it. Values JSON cannot encode are written as ``str()``.
    """

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in extra_fields(record).items():
            payload[f"extra_{name}" if name in _JSON_RESERVED else name] = value
        error = _error(record)
        if error is not None:
            payload["error"] = error
            payload["traceback"] = _traceback(record)
        if record.stack_info:
            payload["stack"] = record.stack_info
        try:
            return _JSON.encode(payload)
        except (TypeError, ValueError):  # NaN, a circular value, a dict with tuple keys, ...
            safe = {name: _json_safe(value) for name, value in payload.items()}
            return json.dumps(safe, ensure_ascii=False, allow_nan=False, default=str)


def _json_safe(value: object) -> object:
    try:
        json.dumps(value, allow_nan=False, default=str)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _escape(text: str) -> str:
    out: list[str] = []
    for char in text:
        escaped = _ESCAPES.get(char)
        if escaped is not None:
            out.append(escaped)
        elif char.isprintable():
            out.append(char)
        else:
            code = ord(char)
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return "".join(out)


def _text_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if text and text.isprintable() and not any(char in ' "=\\' for char in text):
        return text
    return f'"{_escape(text)}"'


def _text_key(name: str) -> str:
    return name if _TEXT_BARE_KEY.fullmatch(name) else re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "_"


def _indented(block: str) -> str:
    return "".join(f"\n    {_escape(line)}" for line in block.splitlines())


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: msg key=value key2="quoted value"``, one record per line.

    Values that are not plain words (spaces, quotes, ``=``, backslashes, control or unprintable
    characters, empty) are double-quoted with those characters escaped; control characters in the
    message are escaped too. A traceback follows on lines indented by four spaces, so it can never
    be mistaken for a record either.
    """

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{_timestamp(record)} {record.levelname} {record.name}: {_escape(record.getMessage())}"]
        parts.extend(f"{_text_key(name)}={_text_value(value)}" for name, value in extra_fields(record).items())
        error = _error(record)
        if error is not None:
            parts.append(f"error={_text_value(error)}")
        line = " ".join(parts)
        trace = _traceback(record)
        if trace is not None:
            line += _indented(trace)
        if record.stack_info:
            line += _indented(record.stack_info)
        return line


class _OpsHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs; a later call replaces it."""


def configure_logging(
    *, fmt: Literal["json", "text"], level: str = "info", stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record to ``stream`` (standard error by default) as structured lines.

    Sets the root logger's level and installs one handler with the chosen formatter and the
    :class:`RedactSecrets` filter, replacing the handler of an earlier call (other handlers are
    left alone). Returns the handler. Raises ``ValueError`` for an unknown format or level.
    """
    numeric = parse_level(level)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JSONFormatter()
    elif fmt == "text":
        formatter = TextFormatter()
    else:
        raise ValueError(f"logs: unknown log format {json.dumps(fmt)} (known: json, text)")
    handler = _OpsHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OpsHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    return handler
