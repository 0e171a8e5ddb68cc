"""YAML config files loaded into frozen dataclass schemas, every mistake named with its line.

A command declares its config as nested frozen dataclasses whose defaults are the defaults::

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Server:
        bind: str = "127.0.0.1:8081"
        data_dir: Path = Path("/var/lib/spiffe-server")
        svid_ttl: Duration = timedelta(hours=1)

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Config:
        trust_domain: str
        server: Server = field(default_factory=Server)

    config = load_config("server.yaml", Config, overrides={"server.bind": args.bind})

Every unknown key is an error that names the key and its line; every value of the wrong type is an
error that names the key path (``server.bind``), the line and the type expected. Field types:
``str``, ``int``, ``float`` (an int is accepted), ``bool`` (only ``true``/``false``; YAML 1.1's
``yes``/``no``/``on``/``off`` are strings here), ``Path``, ``Enum`` (by value) and ``Literal``,
``tuple[X, ...]`` (from a list), ``dict[str, X]`` (from a mapping whose keys the user names, such
as clusters or trust domains), ``X | None``, nested dataclasses, and :data:`Duration` (a
``timedelta`` written as whole seconds or a string like ``"90s"``, ``"5m"``, ``"1h30m"``, ``"7d"``).
A key with no value (``server:`` whose lines are all commented out) means an empty section or an
empty list. A dataclass's ``__post_init__`` may raise ``ValueError``; it becomes a
:class:`ConfigError` naming the section and its line.

Overrides (the command-line flags, which win over the file) are dotted keys with Python values of
the field's type, validated the same way.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from fractions import Fraction
from pathlib import Path, PurePath
from typing import Annotated, Any, Final, Literal, TypeAlias, TypeVar, Union, cast

import yaml

from spiffeops.logs import is_secret_field

__all__ = ["ConfigError", "Duration", "format_duration", "load_config", "parse_config", "parse_duration"]

T = TypeVar("T")

Duration: TypeAlias = Annotated[timedelta, "duration"]
"""A field type: a ``timedelta`` written as whole seconds (``90``) or with units (``"1h30m"``)."""

_QUOTE_LIMIT: Final = 200
_OVERRIDE: Final = "override"


class ConfigError(ValueError):
    """A config file or override is unreadable, malformed, or does not fit the schema.

    The message starts with ``config:`` and the place (``server.yaml:7`` or ``override``).
    """


# --- durations ------------------------------------------------------------------------------

_UNITS_US: Final[Mapping[str, int]] = {
    "d": 86_400_000_000,
    "h": 3_600_000_000,
    "m": 60_000_000,
    "s": 1_000_000,
    "ms": 1_000,
    "us": 1,
    "µs": 1,
}
_FORMAT_UNITS: Final = (("d", 86_400_000_000), ("h", 3_600_000_000), ("m", 60_000_000), ("s", 1_000_000))
_DURATION: Final = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:d|h|ms|m|s|us|µs))+")
_DURATION_PART: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)(d|h|ms|m|s|us|µs)")
_DURATION_MAX_LENGTH: Final = 100
_DURATION_SYNTAX: Final = 'expected numbers with units (d, h, m, s, ms, us), like "90s", "5m", "1h30m" or "7d"'


def _duration_or_reason(text: str) -> timedelta | str:
    """The duration ``text`` denotes, or the reason it denotes none."""
    if text == "0":
        return timedelta(0)
    if len(text) > _DURATION_MAX_LENGTH:
        return f"longer than {_DURATION_MAX_LENGTH} characters"
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text):
        return f'a number needs a unit (d, h, m, s, ms, us), like "{text}s"'
    if not _DURATION.fullmatch(text):
        return _DURATION_SYNTAX
    total = sum(
        (Fraction(number) * _UNITS_US[unit] for number, unit in _DURATION_PART.findall(text)),
        start=Fraction(0),
    )
    if total.denominator != 1:
        return "finer than a microsecond"
    try:
        return timedelta(microseconds=int(total))
    except OverflowError:
        return "too large"


def parse_duration(text: str) -> timedelta:
    """Parse a duration like ``"90s"``, ``"5m"``, ``"24h"``, ``"7d"``, ``"1h30m"`` or ``"1.5h"``.

    Units are ``d``, ``h``, ``m``, ``s``, ``ms`` and ``us``; a bare ``"0"`` is zero. Durations are
    never negative. Raises :class:`ConfigError` (a ``ValueError``, so argparse can use this as a
    ``type``).
    """
    result = _duration_or_reason(text)
    if isinstance(result, str):
        raise ConfigError(f"config: invalid duration {_quote(text)}: {result}")
    return result


def format_duration(duration: timedelta) -> str:
    """The shortest text :func:`parse_duration` reads back as ``duration``: ``"1h30m"``, ``"0s"``."""
    if duration < timedelta(0):
        raise ValueError(f"config: a duration cannot be negative: {duration!r}")
    rest = (duration.days * 86_400 + duration.seconds) * 1_000_000 + duration.microseconds
    if rest == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in _FORMAT_UNITS:
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    millis, micros = divmod(rest, 1000)
    if millis:
        parts.append(f"{millis}ms")
    if micros:
        parts.append(f"{micros}us")
    return "".join(parts)


# --- the located tree: YAML (or overrides) with the place each value came from --------------


@dataclass(slots=True)
class _Scalar:
    value: object
    loc: str


@dataclass(slots=True)
class _Seq:
    items: list[_Node]
    loc: str


@dataclass(slots=True)
class _Map:
    entries: dict[str, _Node]
    key_locs: dict[str, str]
    loc: str


_Node: TypeAlias = _Scalar | _Seq | _Map


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (only true/false) and no timestamps (dates stay strings)."""


_DROPPED_TAGS: Final = frozenset({"tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp"})
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _DROPPED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _quote(value: str) -> str:
    if len(value) > _QUOTE_LIMIT:
        return json.dumps(value[:_QUOTE_LIMIT], ensure_ascii=False) + f"... ({len(value)} characters)"
    return json.dumps(value, ensure_ascii=False)


def _yaml_error(source: str, err: yaml.YAMLError) -> ConfigError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    if context and not context.startswith("while "):  # "expected a single document", ...
        problem = f"{context}, {problem}"
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    return ConfigError(f"config: {where}: invalid YAML: {problem}")


class _Builder:
    """Turns a composed YAML node graph into the located tree, refusing what a config never needs."""

    def __init__(self, loader: _Loader, source: str) -> None:
        self._loader = loader
        self._source = source
        self._active: set[int] = set()

    def _loc(self, node: yaml.Node) -> str:
        return f"{self._source}:{node.start_mark.line + 1}"

    def build(self, node: yaml.Node, path: str = "") -> _Node:
        if id(node) in self._active:
            raise ConfigError(f"config: {self._loc(node)}: a value cannot contain itself (recursive alias)")
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                items = [self.build(item, f"{path}[{index}]") for index, item in enumerate(node.value)]
                return _Seq(items, self._loc(node))
            try:
                value = self._loader.construct_object(node, deep=True)
            except yaml.YAMLError as err:
                raise _yaml_error(self._source, err) from err
            return _Scalar(value, self._loc(node))
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: str) -> _Map:
        result = _Map({}, {}, self._loc(node))
        for key_node, value_node in node.value:
            loc = self._loc(key_node)
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConfigError(f'config: {loc}: merge keys ("<<") are not supported')
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                got = _describe(self.build(key_node), secret=False)
                raise ConfigError(f"config: {loc}: keys must be strings, got {got}{_within(path)}")
            key = str(key_node.value)
            if key in result.entries:
                first = result.key_locs[key].rsplit(":", 1)[1]
                raise ConfigError(f"config: {loc}: duplicate key {_quote(key)}{_within(path)} (first on line {first})")
            result.entries[key] = self.build(value_node, _join(path, key))
            result.key_locs[key] = loc
        return result


def _from_python(value: object) -> _Node:
    if isinstance(value, Mapping):
        entries: dict[str, _Node] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"config: {_OVERRIDE}: keys must be strings, got {key!r}")
            entries[key] = _from_python(item)
        return _Map(entries, dict.fromkeys(entries, _OVERRIDE), _OVERRIDE)
    if isinstance(value, list | tuple):
        return _Seq([_from_python(item) for item in value], _OVERRIDE)
    return _Scalar(value, _OVERRIDE)


# --- the schema ------------------------------------------------------------------------------


def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _init_fields(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_schema(tp: object) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _optional_inner(tp: object) -> object | None:
    """``X`` for ``X | None``; None for any other type."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        others = [arg for arg in args if arg is not type(None)]
        if len(others) == 1 and len(args) == 2:
            inner: object = others[0]
            return inner
    return None


def _check_type(tp: object, where: str, seen: set[type[Any]]) -> None:
    if tp in (str, int, float, bool, Path, timedelta):
        return
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return
    origin = typing.get_origin(tp)
    if origin is Literal:
        return
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            _check_type(args[0], where, seen)
            return
    if origin is dict:
        args = typing.get_args(tp)
        if len(args) == 2 and args[0] is str:
            _check_type(args[1], where, seen)
            return
    inner = _optional_inner(tp)
    if inner is not None:
        _check_type(inner, where, seen)
        return
    if _is_schema(tp):
        _check_schema(cast("type[Any]", tp), seen)
        return
    raise TypeError(f"config: unsupported field type {tp!r} for {where}")


def _check_schema(cls: type[Any], seen: set[type[Any]]) -> None:
    if cls in seen:
        return
    seen.add(cls)
    hints = _hints(cls)
    for f in _init_fields(cls):
        _check_type(hints[f.name], f"{cls.__qualname__}.{f.name}", seen)


def _section_of(tp: object) -> type[Any] | None:
    """The dataclass a field holds, if it is a section (``Section`` or ``Section | None``)."""
    inner = _optional_inner(tp)
    candidate = tp if inner is None else inner
    return cast("type[Any]", candidate) if _is_schema(candidate) else None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe(node: _Node, *, secret: bool) -> str:
    if isinstance(node, _Seq):
        return "a list"
    if isinstance(node, _Map):
        return "a mapping"
    value = node.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean" if secret else f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return "an integer" if secret else f"integer {value}"
    if isinstance(value, float):
        return "a number" if secret else f"number {value!r}"
    if isinstance(value, str):
        return "a string" if secret else f"string {_quote(value)}"
    return type(value).__name__ if secret else f"{type(value).__name__} {_quote(repr(value))}"


def _show(value: object) -> str:
    return _quote(value) if isinstance(value, str) else repr(value)


def _expected(tp: object) -> str:
    if tp is str:
        return "a string"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "a boolean (true or false)"
    if tp is Path:
        return "a path"
    if tp is timedelta:
        return 'a duration (whole seconds, or a string like "90s", "5m" or "1h30m")'
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(_show(member.value) for member in tp)
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(_show(arg) for arg in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list"
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_expected(inner)} or null"
    return "a mapping"


class _Converter:
    def __init__(self, source: str) -> None:
        self._source = source

    def _fail(self, node: _Node, path: str, tp: object, *, secret: bool) -> ConfigError:
        return ConfigError(
            f"config: {node.loc}: {path}: expected {_expected(tp)}, got {_describe(node, secret=secret)}"
        )

    def convert(self, node: _Node, tp: object, path: str, *, secret: bool) -> object:
        inner = _optional_inner(tp)
        if inner is not None:
            if isinstance(node, _Scalar) and node.value is None:
                return None
            try:
                return self._convert(node, inner, path, secret=secret)
            except _MismatchError:
                raise self._fail(node, path, tp, secret=secret) from None
        try:
            return self._convert(node, tp, path, secret=secret)
        except _MismatchError:
            raise self._fail(node, path, tp, secret=secret) from None

    def _convert(self, node: _Node, tp: object, path: str, *, secret: bool) -> object:
        if _is_schema(tp):
            if isinstance(node, _Scalar) and node.value is None:
                return self.build(cast("type[Any]", tp), _Map({}, {}, node.loc), path)
            if not isinstance(node, _Map):
                raise _MismatchError
            return self.build(cast("type[Any]", tp), node, path)
        if typing.get_origin(tp) is tuple:
            (item_type, _) = typing.get_args(tp)
            if isinstance(node, _Scalar) and node.value is None:
                return ()
            if not isinstance(node, _Seq):
                raise _MismatchError
            return tuple(
                self.convert(item, item_type, f"{path}[{index}]", secret=secret)
                for index, item in enumerate(node.items)
            )
        if typing.get_origin(tp) is dict:
            (_, value_type) = typing.get_args(tp)
            if isinstance(node, _Scalar) and node.value is None:
                return {}
            if not isinstance(node, _Map):
                raise _MismatchError
            return {
                key: self.convert(item, value_type, _join(path, key), secret=secret)
                for key, item in node.entries.items()
            }
        if not isinstance(node, _Scalar):
            raise _MismatchError
        return self._scalar(node, tp, path)

    def _scalar(self, node: _Scalar, tp: object, path: str) -> object:
        value = node.value
        if tp is bool or tp is str:
            if type(value) is not tp:
                raise _MismatchError
            return value
        if tp is int:
            if type(value) is not int:
                raise _MismatchError
            return value
        if tp is float:
            if type(value) not in (int, float):
                raise _MismatchError
            return float(cast("float", value))
        if tp is Path:
            if isinstance(value, PurePath):
                return Path(value)
            if not isinstance(value, str) or not value:
                raise _MismatchError
            return Path(value)
        if tp is timedelta:
            return self._duration(node, path)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            if isinstance(value, tp):
                return value
            for member in tp:
                if type(member.value) is type(value) and member.value == value:
                    return member
            raise _MismatchError
        if typing.get_origin(tp) is Literal:
            for allowed in typing.get_args(tp):
                if type(allowed) is type(value) and allowed == value:
                    return value
            raise _MismatchError
        raise TypeError(f"config: unsupported field type {tp!r} for {path}")  # _check_schema stops this

    def _duration(self, node: _Scalar, path: str) -> timedelta:
        value = node.value
        if isinstance(value, timedelta):
            result: timedelta | str = value
        elif type(value) is int:
            try:
                result = timedelta(seconds=value)
            except OverflowError:
                result = "too large"
        elif isinstance(value, str):
            result = _duration_or_reason(value)
            if isinstance(result, str):
                raise ConfigError(f"config: {node.loc}: {path}: invalid duration {_quote(value)}: {result}")
        else:
            raise _MismatchError
        if isinstance(result, str):
            raise ConfigError(f"config: {node.loc}: {path}: invalid duration {value!r}: {result}")
        if result < timedelta(0):
            raise ConfigError(f"config: {node.loc}: {path}: a duration cannot be negative, got {_show(value)}")
        return result

    def build(self, cls: type[Any], node: _Map, path: str) -> object:
        fields = _init_fields(cls)
        known = [f.name for f in fields]
        for key in node.entries:
            if key not in known:
                raise ConfigError(
                    f"config: {node.key_locs[key]}: unknown key {_quote(key)}{_within(path)}"
                    f" (known: {', '.join(known)})"
                )
        hints = _hints(cls)
        values: dict[str, object] = {}
        for f in fields:
            child = node.entries.get(f.name)
            if child is not None:
                values[f.name] = self.convert(child, hints[f.name], _join(path, f.name), secret=is_secret_field(f.name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"config: {node.loc}: missing required key {_quote(f.name)}{_within(path)}")
        try:
            return cls(**values)
        except ValueError as err:
            where = f"{path}: " if path else ""  # the top level needs no name: the file says it
            raise ConfigError(f"config: {node.loc}: {where}{err}") from err


def _within(path: str) -> str:
    return f" in {_quote(path)}" if path else ""


class _MismatchError(Exception):
    """A value of the wrong type: the caller raises the error that names the type expected."""


def _apply_override(schema: type[Any], root: _Map, key: str, value: object) -> None:
    names = key.split(".")
    if not all(names):
        raise ConfigError(f"config: {_OVERRIDE}: invalid key {_quote(key)}")
    cls: type[Any] | None = schema
    node: _Map | None = root
    for depth, name in enumerate(names):
        path = ".".join(names[:depth])
        if cls is None:
            raise ConfigError(f"config: {_OVERRIDE}: {_quote(path)} is not a section, cannot set {_quote(key)}")
        known = [f.name for f in _init_fields(cls)]
        if name not in known:
            raise ConfigError(
                f"config: {_OVERRIDE}: unknown key {_quote(name)}{_within(path)} (known: {', '.join(known)})"
            )
        if depth == len(names) - 1:
            if node is not None:
                node.entries[name] = _from_python(value)
                node.key_locs[name] = _OVERRIDE
            return
        cls = _section_of(_hints(cls)[name])
        if node is not None:
            child = node.entries.get(name)
            if child is None or (isinstance(child, _Scalar) and child.value is None):
                child = _Map({}, {}, _OVERRIDE)
                node.entries[name] = child
                node.key_locs[name] = _OVERRIDE
            # A section the file wrote as a non-mapping stays as it is: converting it reports that.
            node = child if isinstance(child, _Map) else None


def _load(text: str, schema: type[T], source: str, overrides: Mapping[str, object] | None) -> T:
    if not _is_schema(schema):
        raise TypeError(f"config: the schema must be a dataclass, got {schema!r}")
    _check_schema(schema, set())
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as err:  # a character YAML does not allow: checked before parsing
        line = text.count("\n", 0, err.position) + 1
        raise ConfigError(
            f"config: {source}:{line}: invalid YAML: {err.reason} (character #x{err.character:04x})"
        ) from err
    try:
        try:
            document = loader.get_single_node()
        except yaml.YAMLError as err:
            raise _yaml_error(source, err) from err
        if document is None:
            root: _Node = _Map({}, {}, source)
        else:
            root = _Builder(loader, source).build(document)
    except RecursionError as err:  # "[[[[...": the parser and the builder recurse per level
        raise ConfigError(f"config: {source}: invalid YAML: nested too deeply") from err
    finally:
        loader.dispose()
    if isinstance(root, _Scalar) and root.value is None:
        root = _Map({}, {}, root.loc)
    if not isinstance(root, _Map):
        raise ConfigError(f"config: {root.loc}: the top level must be a mapping, got {_describe(root, secret=False)}")
    for key, value in (overrides or {}).items():
        _apply_override(schema, root, key, value)
    return cast("T", _Converter(source).build(schema, root, ""))


def parse_config(
    text: str, schema: type[T], *, source: str = "<config>", overrides: Mapping[str, object] | None = None
) -> T:
    """Load YAML ``text`` into ``schema``; ``source`` names it in errors. See :func:`load_config`."""
    return _load(text, schema, source, overrides)


def load_config(path: str | os.PathLike[str], schema: type[T], *, overrides: Mapping[str, object] | None = None) -> T:
    """Load the YAML file at ``path`` into the dataclass ``schema``, then apply ``overrides``.

    An empty file means every default. Raises :class:`ConfigError` for a file that is missing or
    unreadable, invalid YAML, not a mapping, or that does not fit the schema; ``TypeError`` for a
    schema with a field type this loader does not support.
    """
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"config: {source}: no such file") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config: {source}: not UTF-8 text: {err.reason} at byte {err.start}") from err
    except OSError as err:
        raise ConfigError(f"config: {source}: cannot read: {err.strerror or err}") from err
    return _load(text, schema, source, overrides)
