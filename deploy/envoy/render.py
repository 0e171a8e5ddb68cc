"""Render the Envoy bootstrap templates in this directory: ``${NAME}`` placeholders become values.

    python deploy/envoy/render.py inbound.yaml.tmpl ADMIN_PORT=9901 LISTEN_PORT=8443 APP_PORT=8080 \\
        AGENT_SOCKET=/tmp/spiffe-agent/public/api.sock \\
        ALLOWED_SPIFFE_IDS=spiffe://example.org/frontend,spiffe://example.org/batch [-o inbound.yaml]

Standard library only, so it runs wherever Envoy's config is built. Every variable is checked by
its kind before it reaches the YAML (a port is a number, a SPIFFE ID is a SPIFFE ID, a path holds
no quote), so a value can never add YAML of its own. A list of SPIFFE IDs must stand alone on its
line in the template and becomes one exact URI SAN matcher per ID, indented to match. A variable
the template needs and nobody gave, or one given that the template does not take, is an error
naming it. Exit codes: 0 rendered, 2 a bad template, variable or argument.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import string
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

Value = str | int | Sequence[str]

HERE: Final = Path(__file__).resolve().parent
MAX_SOCKET_PATH: Final = 107  # sun_path holds 108 bytes, the last one NUL

_SPIFFE_ID: Final = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+")
_RESOURCE_NAME: Final = re.compile(r"[A-Za-z0-9._:/-]+")
_SOCKET_PATH: Final = re.compile(r"/[A-Za-z0-9._/@+-]*")
_HOST_LABEL: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class RenderError(ValueError):
    """A template or a variable that cannot be rendered; the message names which and why."""

    def __init__(self, message: str) -> None:
        super().__init__(f"render: {message}")


def _quote(value: object) -> str:
    """``value`` JSON-escaped in quotes and cut to 200 characters, so it cannot forge lines."""
    text = str(value)
    return json.dumps(text[:200] + "..." if len(text) > 200 else text)


def _text(name: str, value: Value) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RenderError(f"{name} takes one value, not a list: {_quote(value)}")
    return str(value)


def _port(name: str, value: Value) -> str:
    text = _text(name, value)
    if not (text.isascii() and text.isdecimal() and int(text) <= 65535):
        raise RenderError(f"{name} must be a port number from 0 to 65535: {_quote(text)}")
    return str(int(text))


def _spiffe_id(name: str, value: Value) -> str:
    text = _text(name, value)
    segments = text.removeprefix("spiffe://").split("/")[1:]
    if not _SPIFFE_ID.fullmatch(text) or any(segment in {".", ".."} for segment in segments):
        raise RenderError(f"{name} must be a SPIFFE ID with a path (spiffe://trust-domain/path): {_quote(text)}")
    return text


def _resource_name(name: str, value: Value) -> str:
    text = _text(name, value)
    if not _RESOURCE_NAME.fullmatch(text):
        raise RenderError(f"{name} must be an SDS resource name (letters, digits and ._:/-): {_quote(text)}")
    return text


def _socket_path(name: str, value: Value) -> str:
    text = _text(name, value)
    if not _SOCKET_PATH.fullmatch(text) or len(text.encode()) > MAX_SOCKET_PATH:
        raise RenderError(
            f"{name} must be an absolute path of letters, digits and ._/@+- "
            f"at most {MAX_SOCKET_PATH} bytes long (a unix socket): {_quote(text)}"
        )
    return text


def _host(name: str, value: Value) -> str:
    text = _text(name, value)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.removesuffix(".").split(".")
    if len(text) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise RenderError(f"{name} must be a DNS name or an IP address: {_quote(text)}")
    return text


def spiffe_ids(name: str, value: Value) -> tuple[str, ...]:
    """A list of SPIFFE IDs: a sequence, or one string separated by commas; order kept, duplicates dropped."""
    if isinstance(value, int):
        raise RenderError(f"{name} must be a list of SPIFFE IDs: {_quote(value)}")
    items = value.split(",") if isinstance(value, str) else [_text(name, item) for item in value]
    ids = tuple(dict.fromkeys(_spiffe_id(name, item.strip()) for item in items if item.strip()))
    if not ids:
        raise RenderError(
            f"{name} must name at least one SPIFFE ID (an empty list would admit every caller the bundle trusts)"
        )
    return ids


def san_matchers(ids: Sequence[str], indent: str) -> str:
    """The YAML items of ``match_typed_subject_alt_names``: an exact URI SAN matcher per ID."""
    return "\n".join(f'{indent}- san_type: URI\n{indent}  matcher: {{exact: "{id_}"}}' for id_ in ids)


@dataclass(frozen=True, slots=True, kw_only=True)
class Variable:
    """A placeholder the templates may use: how its value (or each item of a list) is checked, its default."""

    check: Callable[[str, Value], str]
    default: str | None = None
    is_list: bool = False  # a list of SPIFFE IDs, rendered as SAN matchers
    help: str


VARIABLES: Final[Mapping[str, Variable]] = {
    "ADMIN_PORT": Variable(check=_port, help="Envoy's admin port, on 127.0.0.1"),
    "AGENT_SOCKET": Variable(check=_socket_path, help="the agent's unix socket (Workload API and SDS)"),
    "LISTEN_PORT": Variable(check=_port, help="the port Envoy listens on"),
    "LISTEN_ADDRESS": Variable(check=_host, default="0.0.0.0", help="inbound: the address Envoy listens on"),  # noqa: S104
    "APP_PORT": Variable(check=_port, help="inbound: the local app's port on 127.0.0.1"),
    "ALLOWED_SPIFFE_IDS": Variable(
        check=_spiffe_id,
        is_list=True,
        help="inbound: the callers allowed in, SPIFFE IDs separated by commas",
    ),
    "UPSTREAM_ADDRESS": Variable(check=_host, help="outbound: the upstream's DNS name or IP address"),
    "UPSTREAM_PORT": Variable(check=_port, help="outbound: the upstream's mTLS port"),
    "UPSTREAM_SPIFFE_ID": Variable(check=_spiffe_id, help="outbound: the SPIFFE ID the upstream must present"),
    "SVID_NAME": Variable(
        check=_resource_name, default="default", help="SDS name of Envoy's own SVID: default, or a SPIFFE ID"
    ),
    "BUNDLE_NAME": Variable(
        check=_resource_name,
        default="ROOTCA",
        help="SDS name of the trust bundle: ROOTCA, ALL or spiffe://trust-domain",
    ),
}


def placeholders(template: str) -> tuple[str, ...]:
    """The variables ``template`` uses, in order of first use; an error for an invalid or unknown one."""
    parsed = string.Template(template)
    for match in parsed.pattern.finditer(template):
        if match.group("invalid") is not None or match.group("named") is not None:  # only ${NAME} and $$
            line = template.count("\n", 0, match.start()) + 1
            text = template[match.start() :].partition("\n")[0][:20]
            raise RenderError(f"template line {line}: a $ must start ${{NAME}} or be doubled ($$): {_quote(text)}")
    names = tuple(parsed.get_identifiers())
    unknown = [name for name in names if name not in VARIABLES]
    if unknown:
        raise RenderError(f"template uses an unknown placeholder: {_quote(unknown[0])}")
    return names


def render(template: str, values: Mapping[str, Value]) -> str:
    """``template`` with every ``${NAME}`` replaced by its checked value (or its default)."""
    names = placeholders(template)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise RenderError(
            f"unknown variable{'s' if len(unknown) > 1 else ''}: {', '.join(map(_quote, unknown))}"
            f" (the template takes {', '.join(sorted(names))})"
        )
    missing = sorted(name for name in names if name not in values and VARIABLES[name].default is None)
    if missing:
        raise RenderError(f"missing variable{'s' if len(missing) > 1 else ''}: {', '.join(map(_quote, missing))}")
    scalars: dict[str, str] = {}
    lines: list[str] = []
    for line in template.splitlines(keepends=True):
        stripped = line.strip()
        name = stripped[2:-1] if stripped.startswith("${") and stripped.endswith("}") else ""
        if name in VARIABLES and VARIABLES[name].is_list:
            indent = line[: len(line) - len(line.lstrip())]
            lines.append(san_matchers(spiffe_ids(name, values[name]), indent).replace("$", "$$") + "\n")
        else:
            lines.append(line)
    for name in names:
        variable = VARIABLES[name]
        if variable.is_list:
            continue
        value = values.get(name, variable.default)
        assert value is not None  # a missing variable without a default was refused above
        scalars[name] = variable.check(name, value)
    try:
        return string.Template("".join(lines)).substitute(scalars)
    except KeyError as err:  # a list placeholder inside a line
        raise RenderError(f"{err.args[0]} must stand alone on its line (it becomes a YAML list)") from err


def template_path(name: str) -> Path:
    """``name`` as given if it exists, else the template of that name beside this script."""
    given = Path(name)
    if given.exists() or given.parent != Path():
        return given
    return HERE / name


def parse_assignments(arguments: Sequence[str]) -> dict[str, str]:
    """``NAME=value`` arguments; an error for one without ``=`` or a name given twice."""
    values: dict[str, str] = {}
    for argument in arguments:
        name, equals, value = argument.partition("=")
        if not equals or not name:
            raise RenderError(f"a variable is given as NAME=value: {_quote(argument)}")
        if name in values:
            raise RenderError(f"variable given twice: {_quote(name)}")
        values[name] = value
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="render.py",
        description="Render an Envoy bootstrap template: ${NAME} placeholders become the values given.",
        epilog="variables:\n"
        + "\n".join(
            f"  {name:<20}{variable.help}" + (f" (default: {variable.default})" if variable.default else "")
            for name, variable in VARIABLES.items()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("template", help="a template path, or a name in deploy/envoy/ (inbound.yaml.tmpl)")
    parser.add_argument("variables", nargs="*", metavar="NAME=value")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of to stdout")
    args = parser.parse_args(argv)
    path = template_path(args.template)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        print(f"render: cannot read the template: {err}", file=sys.stderr)
        return 2
    try:
        rendered = render(text, parse_assignments(args.variables))
    except RenderError as err:
        print(f"{path.name}: {err}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(rendered)
    else:
        args.output.write_text(rendered, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
