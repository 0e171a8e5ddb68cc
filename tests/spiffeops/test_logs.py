"""Structured logs: the JSON and text formats, secret redaction, level names."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from spiffeops.logs import (
    JSONFormatter,
    RedactSecrets,
    TextFormatter,
    configure_logging,
    is_secret_field,
    parse_level,
    redact,
)

# 2023-11-14T22:13:20.125Z: a fraction exact in binary, so the milliseconds are exact too.
CREATED = 1_700_000_000.125


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _record(msg: str = "agent attested", *, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("spiffe.agent", level, __file__, 1, msg, None, None)
    record.created = CREATED
    for name, value in extra.items():
        setattr(record, name, value)
    return record


def _raised(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except type(exc):
        record = logging.LogRecord("spiffe.agent", logging.ERROR, __file__, 1, "sync failed", None, sys.exc_info())
    record.created = CREATED
    return record


def test_json_has_the_core_fields_then_every_extra() -> None:
    line = JSONFormatter().format(_record(agent_id="spiffe://example.org/agent/1", attestor="join_token", n=3))
    assert json.loads(line) == {
        "time": "2023-11-14T22:13:20.125Z",
        "level": "info",
        "logger": "spiffe.agent",
        "msg": "agent attested",
        "agent_id": "spiffe://example.org/agent/1",
        "attestor": "join_token",
        "n": 3,
    }
    assert "\n" not in line


def test_json_message_arguments_are_interpolated() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "retrying in %d s", (5,), None)
    assert json.loads(JSONFormatter().format(record))["msg"] == "retrying in 5 s"


def test_json_exception_gives_error_and_traceback() -> None:
    fields = json.loads(JSONFormatter().format(_raised(ValueError("bad entry"))))
    assert fields["error"] == "ValueError: bad entry"
    assert fields["traceback"].startswith("Traceback (most recent call last):")
    assert fields["traceback"].endswith("ValueError: bad entry")


def test_json_no_exception_no_error_fields() -> None:
    fields = json.loads(JSONFormatter().format(_record()))
    assert "error" not in fields
    assert "traceback" not in fields


def test_json_extras_cannot_overwrite_core_fields() -> None:
    record = _record(msg_id=1)
    record.__dict__.update({"level": "forged", "time": "forged"})
    fields = json.loads(JSONFormatter().format(record))
    assert fields["level"] == "info"
    assert fields["time"] == "2023-11-14T22:13:20.125Z"
    assert fields["extra_level"] == "forged"
    assert fields["extra_time"] == "forged"
    assert fields["msg_id"] == 1


def test_json_values_it_cannot_encode_become_text() -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    circular: list[object] = []
    circular.append(circular)
    fields = json.loads(JSONFormatter().format(_record(obj=Opaque(), nan=float("nan"), loop=circular)))
    assert fields["obj"] == "opaque!"
    assert fields["nan"] == "nan"
    assert fields["loop"] == "[[...]]"


def test_json_hostile_values_stay_on_one_line() -> None:
    line = JSONFormatter().format(_record("login\nforged", user='x"\n{"level": "error"}'))
    assert "\n" not in line
    assert json.loads(line)["user"] == 'x"\n{"level": "error"}'


def test_text_format() -> None:
    line = TextFormatter().format(_record(agent_id="spiffe://example.org/agent/1", attestor="join token", ok=True))
    assert line == (
        "2023-11-14T22:13:20.125Z INFO spiffe.agent: agent attested "
        'agent_id=spiffe://example.org/agent/1 attestor="join token" ok=true'
    )


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ("", '""'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("back\\slash", '"back\\\\slash"'),
        ("line\nforged=1", '"line\\nforged=1"'),
        ("cr\rtab\t", '"cr\\rtab\\t"'),
        ("bell\x07", '"bell\\u0007"'),
        ("ls\u2028ps\u2029", '"ls\\u2028ps\\u2029"'),
        ("café", "café"),
        (None, "null"),
        (False, "false"),
        (42, "42"),
        (1.5, "1.5"),
    ],
)
def test_text_values_are_quoted_and_escaped(value: object, shown: str) -> None:
    line = TextFormatter().format(_record("m", v=value))
    assert line.endswith(f" m v={shown}")
    assert "\n" not in line


def test_text_message_control_characters_are_escaped() -> None:
    line = TextFormatter().format(_record("user logged in\n2023-11-14T22:13:20.125Z ERROR forged: x"))
    assert (
        line == "2023-11-14T22:13:20.125Z INFO spiffe.agent: user logged in\\n2023-11-14T22:13:20.125Z ERROR forged: x"
    )


def test_text_strange_keys_are_made_safe() -> None:
    record = _record("m")
    record.__dict__["bad key\n"] = 1
    assert TextFormatter().format(record).endswith(" m bad_key_=1")


def test_text_traceback_is_indented_under_the_record() -> None:
    lines = TextFormatter().format(_raised(RuntimeError("boom\nFAKE LINE"))).split("\n")
    assert lines[0] == '2023-11-14T22:13:20.125Z ERROR spiffe.agent: sync failed error="RuntimeError: boom\\nFAKE LINE"'
    assert lines[1] == "    Traceback (most recent call last):"
    assert all(line.startswith("    ") for line in lines[1:])
    assert lines[-1] == "    FAKE LINE"


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("key", True),
        ("private_key", True),
        ("token", True),
        ("join_token", True),
        ("password", True),
        ("db_password", True),
        ("secret", True),
        ("client-secret", True),
        ("Private_Key", True),
        ("credentials", True),
        ("key_id", False),
        ("token_ttl", False),
        ("keys_loaded", False),
        ("agent_id", False),
        ("monkey", False),
    ],
)
def test_is_secret_field(name: str, secret: bool) -> None:
    assert is_secret_field(name) is secret


def test_redact() -> None:
    assert redact({"agent_id": "a", "join_token": "t0ps3cret", "key": b"pem"}) == {
        "agent_id": "a",
        "join_token": "[redacted]",
        "key": "[redacted]",
    }


def test_redact_filter_edits_the_record() -> None:
    record = _record(private_key="-----BEGIN PRIVATE KEY-----", key_id="k1")
    assert RedactSecrets().filter(record)
    assert JSONFormatter().format(record).endswith('"private_key": "[redacted]", "key_id": "k1"}')


@pytest.mark.parametrize(
    ("name", "level"), [("debug", 10), ("INFO", 20), ("Warning", 30), ("warn", 30), ("error", 40), ("critical", 50)]
)
def test_parse_level(name: str, level: int) -> None:
    assert parse_level(name) == level


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("verbose", 'logs: unknown log level "verbose" (known: debug, info, warning, error, critical)'),
        ("", 'logs: unknown log level "" (known: debug, info, warning, error, critical)'),
        ("10", 'logs: unknown log level "10" (known: debug, info, warning, error, critical)'),
    ],
)
def test_unknown_level(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^logs:") as caught:
        parse_level(name)
    assert str(caught.value) == message


def test_configure_logging_json_end_to_end() -> None:
    stream = io.StringIO()
    configure_logging(fmt="json", level="INFO", stream=stream)
    log = logging.getLogger("spiffe.server.test")
    log.debug("hidden")
    log.info("agent attested", extra={"agent_id": "spiffe://example.org/a", "join_token": "s3cr3t"})
    try:
        raise KeyError("entry")
    except KeyError:
        log.exception("lookup failed")
    lines = stream.getvalue().splitlines(keepends=False)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["msg"] for r in records] == ["agent attested", "lookup failed"]
    assert records[0]["join_token"] == "[redacted]"
    assert "s3cr3t" not in stream.getvalue()
    assert records[1]["level"] == "error"
    assert records[1]["error"] == "KeyError: 'entry'"
    assert len(lines) == 2


def test_configure_logging_text_end_to_end() -> None:
    stream = io.StringIO()
    configure_logging(fmt="text", level="debug", stream=stream)
    logging.getLogger("spiffe.proxy").debug("accepted", extra={"peer": "10.0.0.1:5000", "password": "hunter2"})
    line = stream.getvalue()
    assert line.endswith(" DEBUG spiffe.proxy: accepted peer=10.0.0.1:5000 password=[redacted]\n")


def test_configure_logging_again_replaces_its_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    before = len(root.handlers)
    configure_logging(fmt="json", stream=first)
    handler = configure_logging(fmt="text", level="warning", stream=second)
    assert len(root.handlers) == before + 1
    assert handler in root.handlers
    assert root.level == logging.WARNING
    logging.getLogger("x").warning("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1


def test_configure_logging_defaults_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="text")
    logging.getLogger("x").info("to stderr")
    assert "INFO x: to stderr" in capsys.readouterr().err


def test_configure_logging_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r'^logs: unknown log level "loud"'):
        configure_logging(fmt="json", level="loud")
    with pytest.raises(ValueError, match=r'^logs: unknown log format "xml" \(known: json, text\)$'):
        configure_logging(fmt="xml", level="info")  # type: ignore[arg-type]
