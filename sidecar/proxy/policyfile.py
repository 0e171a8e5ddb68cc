"""The policy file (``--policy FILE``): the allow rules of each listener, in versioned YAML.

The flags (``--allow-*``) fit a proxy whose rules never change; the file is for rules that do:
the proxy re-reads it when it changes and on SIGHUP, and new connections follow the new rules
(see :mod:`sidecar.proxy.app`). The file::

    version: 1
    listeners:
      - listen: 0.0.0.0:8443            # matched against --listen, as an address
        allow:
          ids: [spiffe://example.org/frontend]
          trust_domains: [partner.example]
          patterns: ["spiffe://example.org/ns/*/sa/**"]
    default:                            # for a --listen the file does not name (optional)
      allow:
        any_id: true

``allow`` takes ``ids``, ``trust_domains``, ``patterns`` (lists, OR-ed, the grammar of the
flags) and ``any_id`` (``true``: any verified peer, alone). Each rule set must allow someone, as
with the flags: an empty ``allow`` is an error, not a proxy that refuses everyone. A listener is
matched by address, not by text: ``127.0.0.1:8443`` and ``127.000.0.1:8443`` are different
texts but ``[::1]:8443`` and ``[0:0::1]:8443`` the same address, and host names compare
without case. The file and ``--allow-*`` flags are exclusive (the CLI says so).

Parsing is pure (:func:`parse_policy_file` takes text) and every mistake is a
:class:`PolicyFileError` naming the file, the line and the key, and quoting the input: the YAML
and its types through :mod:`spiffeops.config`, the rules here.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from sidecar.proxy.address import Address
from sidecar.proxy.errors import ProxyConfigError
from sidecar.proxy.policy import Policy, parse_id, parse_pattern, parse_trust_domain
from spiffecore import SpiffeError
from spiffecore.errors import quote
from spiffeops.config import ConfigError, load_config, parse_config

__all__ = ["PolicyFile", "PolicyFileError", "load_policy_file", "parse_policy_file"]

VERSION: Final = 1
ALLOWS_NOTHING: Final = "allows nothing: give ids, trust_domains or patterns, or any_id: true"
ANY_AND_RULES: Final = "any_id: true cannot be combined with ids, trust_domains or patterns"
NO_RULE: Final = "the file has no rule: give listeners, a default, or both"


class PolicyFileError(ProxyConfigError):
    """The policy file is unreadable, malformed, or has no rule for this proxy's listener."""

    layer = "policy"


def _check_all(key: str, texts: tuple[str, ...], parse: Callable[[str], object]) -> None:
    for index, text in enumerate(texts):
        try:
            parse(text)
        except SpiffeError as err:
            raise ValueError(f"{key}[{index}]: {err}") from err


@dataclass(frozen=True, slots=True, kw_only=True)
class Allow:
    """An ``allow:`` mapping, checked as the flags are; :attr:`policy` is the value it denotes."""

    ids: tuple[str, ...] = ()
    trust_domains: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    any_id: bool = False
    policy: Policy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A ValueError here becomes a ConfigError naming this section and its line.
        _check_all("ids", self.ids, parse_id)
        _check_all("trust_domains", self.trust_domains, parse_trust_domain)
        _check_all("patterns", self.patterns, parse_pattern)
        rules = self.ids or self.trust_domains or self.patterns
        if self.any_id and rules:
            raise ValueError(ANY_AND_RULES)
        if not self.any_id and not rules:
            raise ValueError(ALLOWS_NOTHING)
        policy = Policy.from_rules(
            allow_id=self.ids,
            allow_trust_domain=self.trust_domains,
            allow_pattern=self.patterns,
            allow_any_id=self.any_id,
        )
        object.__setattr__(self, "policy", policy)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerRules:
    """One item of ``listeners:``."""

    listen: str
    allow: Allow
    address: Address = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            address = Address.parse(self.listen)
        except ProxyConfigError as err:
            raise ValueError(f"listen: {err.rule}: {quote(self.listen)}") from err
        object.__setattr__(self, "address", address)


@dataclass(frozen=True, slots=True, kw_only=True)
class DefaultRules:
    """``default:``, for a listener the file does not name."""

    allow: Allow


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyFileSchema:
    """The whole file, as :mod:`spiffeops.config` reads it."""

    version: Literal[1]
    listeners: tuple[ListenerRules, ...] = ()
    default: DefaultRules | None = None

    def __post_init__(self) -> None:
        if not self.listeners and self.default is None:
            raise ValueError(NO_RULE)
        seen: dict[object, int] = {}
        for index, rules in enumerate(self.listeners):
            key = match_key(rules.address)
            if key in seen:
                raise ValueError(
                    f"listeners[{index}].listen: {quote(rules.listen)} is the address of "
                    f"listeners[{seen[key]}] already: one entry per listener"
                )
            seen[key] = index


@dataclass(frozen=True, slots=True)
class PolicyFile:
    """A parsed policy file: the rules of each named listener, and the default (or None)."""

    source: str
    listeners: tuple[tuple[Address, Policy], ...]
    default: Policy | None

    def for_listener(self, listen: Address) -> Policy:
        """The rules for ``listen``: its own entry, else the default; :class:`PolicyFileError` if neither."""
        key = match_key(listen)
        for address, policy in self.listeners:
            if match_key(address) == key:
                return policy
        if self.default is not None:
            return self.default
        named = ", ".join(str(address) for address, _ in self.listeners)
        raise PolicyFileError(
            f"{self.source}: no rule for this proxy's listener (the file names {named}; "
            "add an entry for it, or a default)",
            str(listen),
        )


def match_key(address: Address) -> tuple[str, str, int]:
    """What two addresses share when they are the same listener: the unix path, or the host
    (an IP address in its canonical form, a name in lower case without a final dot) and port."""
    if address.is_unix:
        return ("unix", address.path, 0)
    try:
        host = ipaddress.ip_address(address.host).compressed
    except ValueError:
        host = address.host.lower().rstrip(".")
    return ("tcp", host, address.port)


def parse_policy_file(text: str, *, source: str = "<policy>") -> PolicyFile:
    """Parse the YAML ``text`` of a policy file; ``source`` names it in errors."""
    try:
        schema = parse_config(text, PolicyFileSchema, source=source)
    except ConfigError as err:
        raise _file_error(err) from err
    return _from_schema(schema, source)


def load_policy_file(path: str | os.PathLike[str]) -> PolicyFile:
    """Read and parse the policy file at ``path``; :class:`PolicyFileError` for anything wrong."""
    try:
        schema = load_config(path, PolicyFileSchema)
    except ConfigError as err:
        raise _file_error(err) from err
    return _from_schema(schema, os.fspath(path))


def _from_schema(schema: PolicyFileSchema, source: str) -> PolicyFile:
    return PolicyFile(
        source=source,
        listeners=tuple((rules.address, rules.allow.policy) for rules in schema.listeners),
        default=schema.default.allow.policy if schema.default is not None else None,
    )


def _file_error(err: ConfigError) -> PolicyFileError:
    # spiffeops.config starts every message with "config: "; this error's layer says "policy: ".
    return PolicyFileError(str(err).removeprefix("config: "))
