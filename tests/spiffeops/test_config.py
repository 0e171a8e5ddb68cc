"""YAML config files into frozen dataclass schemas: values, defaults, overrides, exact errors."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spiffeops.config import ConfigError, Duration, format_duration, load_config, parse_config, parse_duration


class Store(enum.Enum):
    SQLITE = "sqlite"
    POSTGRES = "postgres"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSection:
    bind: str = "127.0.0.1:8081"
    data_dir: Path = Path("/var/lib/spiffe-server")
    workers: int = 1
    load_factor: float = 0.75
    debug: bool = False
    svid_ttl: Duration = timedelta(hours=1)
    store: Store = Store.SQLITE
    log_format: Literal["json", "text"] = "text"
    allow: tuple[str, ...] = ()
    ports: tuple[int, ...] = (8081,)
    join_token: str | None = None
    rotate_every: Duration | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    max_entries: int = 1000

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {self.max_entries}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    trust_domain: str = "example.org"
    server: ServerSection = field(default_factory=ServerSection)
    limits: Limits | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Required:
    trust_domain: str
    server: ServerSection = field(default_factory=ServerSection)


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_full_file(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        """\
# spiffe-server
trust_domain: prod.example.org
server:
  bind: "[::1]:8081"
  data_dir: /srv/spiffe
  workers: 4
  load_factor: 1          # an int is a fine float
  debug: true
  svid_ttl: 1h30m
  store: postgres
  log_format: json
  allow:
    - spiffe://prod.example.org/admin
    - spiffe://prod.example.org/ops
  ports: [8081, 8082]
  join_token: null
  rotate_every: 600
limits:
  max_entries: 5
""",
    )
    assert load_config(path, Config) == Config(
        trust_domain="prod.example.org",
        server=ServerSection(
            bind="[::1]:8081",
            data_dir=Path("/srv/spiffe"),
            workers=4,
            load_factor=1.0,
            debug=True,
            svid_ttl=timedelta(hours=1, minutes=30),
            store=Store.POSTGRES,
            log_format="json",
            allow=("spiffe://prod.example.org/admin", "spiffe://prod.example.org/ops"),
            ports=(8081, 8082),
            join_token=None,
            rotate_every=timedelta(minutes=10),
        ),
        limits=Limits(max_entries=5),
    )


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "~\n"])
def test_an_empty_file_means_every_default(tmp_path: Path, text: str) -> None:
    assert load_config(_file(tmp_path, text), Config) == Config()


def test_an_empty_section_or_list_means_defaults_or_empty(tmp_path: Path) -> None:
    path = _file(tmp_path, "server:\n  # bind: x\n  allow:\n  # - a\n")
    assert load_config(path, Config) == Config(server=ServerSection(allow=()))
    assert load_config(_file(tmp_path, "limits:\n"), Config).limits is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bind: no", "no"),  # YAML 1.1 would make this the boolean false: here it is a string
        ("bind: on", "on"),
        ("bind: 2024-01-01", "2024-01-01"),
        ("bind: '8081'", "8081"),
        ("bind: x:8081", "x:8081"),
    ],
)
def test_strings_stay_strings(tmp_path: Path, text: str, expected: str) -> None:
    assert load_config(_file(tmp_path, f"server:\n  {text}\n"), Config).server.bind == expected


def test_aliases_are_followed(tmp_path: Path) -> None:
    path = _file(tmp_path, "trust_domain: &td example.com\nserver:\n  bind: *td\n")
    assert load_config(path, Config).server.bind == "example.com"


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "server:\n  bind: 0.0.0.0:1\n  workers: 2\n")
    config = load_config(
        path,
        Config,
        overrides={
            "server.bind": "127.0.0.1:9",
            "server.data_dir": "/srv/x",
            "server.svid_ttl": "5m",
            "server.store": Store.POSTGRES,
            "server.allow": ["a", "b"],
            "limits.max_entries": 7,
            "trust_domain": "other.org",
        },
    )
    assert config == Config(
        trust_domain="other.org",
        server=ServerSection(
            bind="127.0.0.1:9",
            workers=2,
            data_dir=Path("/srv/x"),
            svid_ttl=timedelta(minutes=5),
            store=Store.POSTGRES,
            allow=("a", "b"),
        ),
        limits=Limits(max_entries=7),
    )


def test_override_python_values_and_order(tmp_path: Path) -> None:
    path = _file(tmp_path, "")
    overrides: dict[str, object] = {"server.data_dir": Path("/p"), "server.svid_ttl": timedelta(seconds=3)}
    config = load_config(path, Config, overrides=overrides)
    assert config.server == ServerSection(data_dir=Path("/p"), svid_ttl=timedelta(seconds=3))
    # Overrides apply in order: a whole section replaces what earlier keys set in it.
    config = load_config(path, Config, overrides={**overrides, "server": {"workers": 3}})
    assert config.server == ServerSection(workers=3)
    config = load_config(path, Config, overrides={"server": {"workers": 3}, **overrides})
    assert config.server == ServerSection(workers=3, data_dir=Path("/p"), svid_ttl=timedelta(seconds=3))


def test_required_keys(tmp_path: Path) -> None:
    assert load_config(_file(tmp_path, "trust_domain: a.org\n"), Required) == Required(trust_domain="a.org")
    path = _file(tmp_path, "")
    assert load_config(path, Required, overrides={"trust_domain": "b.org"}).trust_domain == "b.org"
    with pytest.raises(ConfigError) as caught:
        load_config(path, Required)
    assert str(caught.value) == f'config: {path}: missing required key "trust_domain"'


KNOWN = (
    "bind, data_dir, workers, load_factor, debug, svid_ttl, store, log_format, allow, ports, join_token, rotate_every"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trsut_domain: x\n", ':1: unknown key "trsut_domain" (known: trust_domain, server, limits)'),
        ("server:\n  bind: x\n  bnid: y\n", f':3: unknown key "bnid" in "server" (known: {KNOWN})'),
        ("server:\n  workers: four\n", ':2: server.workers: expected an integer, got string "four"'),
        ("server:\n  workers: 1.5\n", ":2: server.workers: expected an integer, got number 1.5"),
        ("server:\n  workers: true\n", ":2: server.workers: expected an integer, got boolean true"),
        ("server:\n  workers:\n", ":2: server.workers: expected an integer, got null"),
        ("server:\n  bind: 8081\n", ":2: server.bind: expected a string, got integer 8081"),
        ("server:\n  bind: [a]\n", ":2: server.bind: expected a string, got a list"),
        ("server:\n  bind: {a: 1}\n", ":2: server.bind: expected a string, got a mapping"),
        ("server:\n  load_factor: x\n", ':2: server.load_factor: expected a number, got string "x"'),
        ("server:\n  debug: yes\n", ':2: server.debug: expected a boolean (true or false), got string "yes"'),
        ("server:\n  debug: 1\n", ":2: server.debug: expected a boolean (true or false), got integer 1"),
        ("server:\n  debug: 'true'\n", ':2: server.debug: expected a boolean (true or false), got string "true"'),
        ("server:\n  data_dir: ''\n", ':2: server.data_dir: expected a path, got string ""'),
        ("server:\n  data_dir: 7\n", ":2: server.data_dir: expected a path, got integer 7"),
        ("server:\n  store: mysql\n", ':2: server.store: expected one of "sqlite", "postgres", got string "mysql"'),
        ("server:\n  log_format: XML\n", ':2: server.log_format: expected one of "json", "text", got string "XML"'),
        ("server:\n  allow: spiffe://a\n", ':2: server.allow: expected a list, got string "spiffe://a"'),
        ("server:\n  allow:\n    - a\n    - [b]\n", ":4: server.allow[1]: expected a string, got a list"),
        ("server:\n  ports: [1, x]\n", ':2: server.ports[1]: expected an integer, got string "x"'),
        ("server:\n  join_token: 12345\n", ":2: server.join_token: expected a string or null, got an integer"),
        ("server:\n  join_token: [s3cret]\n", ":2: server.join_token: expected a string or null, got a list"),
        (
            "server:\n  svid_ttl: 5x\n",
            ':2: server.svid_ttl: invalid duration "5x": expected numbers with units (d, h, m, s, ms, us),'
            ' like "90s", "5m", "1h30m" or "7d"',
        ),
        ("server:\n  svid_ttl: -5\n", ":2: server.svid_ttl: a duration cannot be negative, got -5"),
        (
            "server:\n  svid_ttl: 1.5\n",
            ':2: server.svid_ttl: expected a duration (whole seconds, or a string like "90s", "5m" or "1h30m"),'
            " got number 1.5",
        ),
        (
            "server:\n  rotate_every: true\n",
            ':2: server.rotate_every: expected a duration (whole seconds, or a string like "90s", "5m" or "1h30m")'
            " or null, got boolean true",
        ),
        ("server: [a]\n", ":1: server: expected a mapping, got a list"),
        ("server: 5\n", ":1: server: expected a mapping, got integer 5"),
        ("limits: nope\n", ':1: limits: expected a mapping or null, got string "nope"'),
        ("limits:\n  max_entries: 0\n", ":2: limits: max_entries must be at least 1, got 0"),
        ("server:\n  bind: a\n  bind: b\n", ':3: duplicate key "bind" in "server" (first on line 2)'),
        ("1: x\n", ":1: keys must be strings, got integer 1"),
        ("server:\n  [a]: x\n", ':2: keys must be strings, got a list in "server"'),
        ("base: &b {bind: x}\nserver:\n  <<: *b\n", ':3: merge keys ("<<") are not supported'),
        ("- a\n- b\n", ":1: the top level must be a mapping, got a list"),
        ("just text\n", ':1: the top level must be a mapping, got string "just text"'),
        ("server:\n  bind: [a\n", ":3: invalid YAML: expected ',' or ']', but got '<stream end>'"),
        ("a: 1\n---\nb: 2\n", ":2: invalid YAML: expected a single document in the stream, but found another document"),
        ("server:\n bind: x\n  workers: 1\n", ":3: invalid YAML: mapping values are not allowed here"),
        ("server:\n  bind: !custom x\n", ":2: invalid YAML: could not determine a constructor for the tag '!custom'"),
        ("a: &a [*a]\n", ":1: a value cannot contain itself (recursive alias)"),
    ],
)
def test_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, Config)
    assert str(caught.value) == f"config: {path}{message}"


def test_error_values_are_quoted_and_cut(tmp_path: Path) -> None:
    path = _file(tmp_path, f'server:\n  workers: "{"x" * 300}\\n"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, Config)
    assert str(caught.value) == (
        f'config: {path}:2: server.workers: expected an integer, got string "{"x" * 200}"... (301 characters)'
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"server.bnid": "x"}, f'config: override: unknown key "bnid" in "server" (known: {KNOWN})'),
        ({"sevrer.bind": "x"}, 'config: override: unknown key "sevrer" (known: trust_domain, server, limits)'),
        ({"server.bind.host": "x"}, 'config: override: "server.bind" is not a section, cannot set "server.bind.host"'),
        ({"server..bind": "x"}, 'config: override: invalid key "server..bind"'),
        ({"": "x"}, 'config: override: invalid key ""'),
        ({"server.workers": "4"}, 'config: override: server.workers: expected an integer, got string "4"'),
        ({"server.debug": 1}, "config: override: server.debug: expected a boolean (true or false), got integer 1"),
        (
            {"server.svid_ttl": "soon"},
            'config: override: server.svid_ttl: invalid duration "soon": expected numbers'
            ' with units (d, h, m, s, ms, us), like "90s", "5m", "1h30m" or "7d"',
        ),
        (
            {"server.svid_ttl": timedelta(seconds=-1)},
            "config: override: server.svid_ttl: a duration cannot be negative,"
            " got datetime.timedelta(days=-1, seconds=86399)",
        ),
        ({"server": {"bnid": 1}}, f'config: override: unknown key "bnid" in "server" (known: {KNOWN})'),
        ({"server": {1: 1}}, "config: override: keys must be strings, got 1"),
        ({"server.allow": [1]}, "config: override: server.allow[0]: expected a string, got integer 1"),
        ({"limits.max_entries": 0}, "config: override: limits: max_entries must be at least 1, got 0"),
        (
            {"server.store": object},
            'config: override: server.store: expected one of "sqlite", "postgres", got type "<class \'object\'>"',
        ),
    ],
)
def test_override_errors(tmp_path: Path, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_file(tmp_path, ""), Config, overrides=overrides)
    assert str(caught.value) == message


def test_a_file_error_is_not_hidden_by_an_override(tmp_path: Path) -> None:
    path = _file(tmp_path, "server: 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, Config, overrides={"server.bind": "x"})
    assert str(caught.value) == f"config: {path}:1: server: expected a mapping, got integer 5"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, Config)
    assert str(caught.value) == f"config: {path}: no such file"


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, Config)
    assert str(caught.value) == f"config: {tmp_path}: cannot read: Is a directory"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"trust_domain: caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, Config)
    assert str(caught.value) == f"config: {path}: not UTF-8 text: invalid continuation byte at byte 17"


def test_parse_config_names_its_source() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("x: 1\n", Config, source="<flags>")
    assert str(caught.value) == 'config: <flags>:1: unknown key "x" (known: trust_domain, server, limits)'


@dataclass(frozen=True)
class Unsupported:
    names: list[str] = field(default_factory=list)


def test_unsupported_schemas_are_programming_errors() -> None:
    with pytest.raises(TypeError, match=r"^config: unsupported field type list\[str\] for Unsupported.names$"):
        parse_config("", Unsupported)
    with pytest.raises(TypeError, match=r"^config: the schema must be a dataclass"):
        parse_config("", dict)


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "duration"),
    [
        ("0", timedelta(0)),
        ("0s", timedelta(0)),
        ("90s", timedelta(seconds=90)),
        ("5m", timedelta(minutes=5)),
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("30m1h", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(hours=1, minutes=30)),
        ("250ms", timedelta(milliseconds=250)),
        ("1s500ms", timedelta(seconds=1, milliseconds=500)),
        ("7us", timedelta(microseconds=7)),
        ("7µs", timedelta(microseconds=7)),
        ("0.000001s", timedelta(microseconds=1)),
        ("1d2h3m4s5ms6us", timedelta(days=1, hours=2, minutes=3, seconds=4, milliseconds=5, microseconds=6)),
    ],
)
def test_parse_duration(text: str, duration: timedelta) -> None:
    assert parse_duration(text) == duration


SYNTAX = 'expected numbers with units (d, h, m, s, ms, us), like "90s", "5m", "1h30m" or "7d"'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", f'config: invalid duration "": {SYNTAX}'),
        ("90", 'config: invalid duration "90": a number needs a unit (d, h, m, s, ms, us), like "90s"'),
        ("5x", f'config: invalid duration "5x": {SYNTAX}'),
        ("-5s", f'config: invalid duration "-5s": {SYNTAX}'),
        ("5 m", f'config: invalid duration "5 m": {SYNTAX}'),
        (" 5m", f'config: invalid duration " 5m": {SYNTAX}'),
        ("5M", f'config: invalid duration "5M": {SYNTAX}'),
        ("h", f'config: invalid duration "h": {SYNTAX}'),
        (".5s", f'config: invalid duration ".5s": {SYNTAX}'),
        ("0.0000001s", 'config: invalid duration "0.0000001s": finer than a microsecond'),
        ("1000000000d", 'config: invalid duration "1000000000d": too large'),
        ("9" * 101 + "s", f'config: invalid duration "{"9" * 101}s": longer than 100 characters'),
    ],
)
def test_invalid_durations(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("duration", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(days=7), "7d"),
        (timedelta(days=1, microseconds=1), "1d1us"),
        (timedelta(milliseconds=1500), "1s500ms"),
    ],
)
def test_format_duration(duration: timedelta, text: str) -> None:
    assert format_duration(duration) == text


def test_format_duration_refuses_negative() -> None:
    with pytest.raises(ValueError, match=r"^config: a duration cannot be negative: datetime.timedelta\(days=-1"):
        format_duration(timedelta(seconds=-1))


@given(st.timedeltas(min_value=timedelta(0)))
def test_duration_round_trip(duration: timedelta) -> None:
    assert parse_duration(format_duration(duration)) == duration


@given(st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=10**6)))
def test_integer_seconds_in_a_file_are_durations(duration: timedelta) -> None:
    seconds = int(duration.total_seconds())
    config = parse_config(f"server:\n  svid_ttl: {seconds}\n", Config)
    assert config.server.svid_ttl == timedelta(seconds=seconds)
