"""The bookkeeping of one SDS stream, with no I/O and no clock (in the style of h11).

A session is fed the client's requests (:meth:`SotwSession.receive`, :meth:`DeltaSession.receive`)
and answers with the events they mean (a subscription, an ACK, a NACK with Envoy's reason, a stale
nonce that is ignored). When the caller has the current resources for the subscription, it asks
:meth:`~SotwSession.respond` what to send: a response, or ``None`` when the client already has (or
has rejected) exactly this content. Resources are opaque here: a mapping from resource name to
its version, a string derived from the resource's content; the servicer pairs the names in a
response with the secrets it built.

The rules, for state of the world (``StreamSecrets``; Envoy opens one stream per secret name):

================================  =================================================================
request                           meaning and answer
================================  =================================================================
empty nonce                       first request of a stream, or a reconnect (``version_info`` then
                                  holds the client's last accepted version): always answered with
                                  the full current state, whatever version the client says it has
nonce of another response         stale (the client had not yet seen our latest response): ignored
our latest nonce, no error        ACK: the client now runs that version
our latest nonce, error_detail    NACK: the client keeps its last accepted version; nothing is
                                  re-sent until the content changes
names differ from the last ones   a new subscription: answered with the full state of the new names
================================  =================================================================

Between requests, :meth:`~SotwSession.respond` sends whenever the content differs from what was
last sent (a rotation), whether that was ACKed, NACKed or is still unanswered.

Incremental (``DeltaSecrets``): the first request's ``resource_names_subscribe`` names the
resources, or is empty (or holds ``*``) for all of them (wildcard); ``initial_resource_versions``
tells what a reconnecting client already has. Later requests add and remove names. A response
carries only resources whose version differs from what the client has (or was last sent), and the
names of resources that went away; ACK and NACK work as above.

Misuse by the caller (responding before any request) raises :class:`SessionUsageError`; a client
breaking the protocol raises :class:`ProtocolViolation`, whose message the servicer returns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

WILDCARD: Final = "*"


class SessionUsageError(RuntimeError):
    """The session was used out of order (a bug in the caller, not in the client)."""


class ProtocolViolation(ValueError):  # noqa: N818 - named by condition, as h11's RemoteProtocolError
    """The client broke the xDS protocol; the message says how (for the gRPC status)."""

    def __str__(self) -> str:
        return f"sds: {self.args[0]}"


# --- inputs --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejection:
    """A client's ``error_detail``: why it rejected a response (``google.rpc.Status``)."""

    code: int
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SotwRequest:
    """What a session needs of a ``DiscoveryRequest``."""

    names: tuple[str, ...]
    version_info: str = ""
    nonce: str = ""
    error: Rejection | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaRequest:
    """What a session needs of a ``DeltaDiscoveryRequest``."""

    subscribe: tuple[str, ...] = ()
    unsubscribe: tuple[str, ...] = ()
    initial_versions: Mapping[str, str] = field(default_factory=dict)
    nonce: str = ""
    error: Rejection | None = None


# --- outputs -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SotwResponse:
    """Send these resources (in this order) with this version and nonce."""

    version: str
    nonce: str
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaResponse:
    """Send these resources (each with its own version), and these removals, with this nonce."""

    system_version: str
    nonce: str
    updated: Mapping[str, str]
    removed: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribed:
    """The client asks for ``names`` (empty: everything). ``reconnect``: it had a version before."""

    names: tuple[str, ...]
    previous: tuple[str, ...] | None
    client_version: str = ""

    @property
    def reconnect(self) -> bool:
        return self.previous is None and bool(self.client_version)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaSubscribed:
    """The client's subscription changed."""

    subscribed: tuple[str, ...]
    unsubscribed: tuple[str, ...]
    wildcard: bool
    initial_versions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Acked:
    """The client applied the response with this version and nonce."""

    version: str
    nonce: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Nacked:
    """The client rejected ``version`` (with ``rejection``) and keeps running ``kept_version``."""

    version: str
    nonce: str
    kept_version: str
    rejection: Rejection


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleNonce:
    """A request answering an older response than the latest: ignored."""

    nonce: str


Event: TypeAlias = Subscribed | DeltaSubscribed | Acked | Nacked | StaleNonce


def content_version(versions: Mapping[str, str]) -> str:
    """One version for a set of named resources: identical content gives an identical version."""
    digest = hashlib.sha256()
    for name in sorted(versions):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(versions[name].encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class _Sent:
    version: str
    nonce: str
    versions: Mapping[str, str]


class _Nonces:
    """Nonces unique within a stream; the prefix keeps them apart across streams and restarts."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._count = 0

    def next(self) -> str:
        self._count += 1
        return f"{self._prefix}{self._count}"


# --- state of the world --------------------------------------------------------------------------------


class SotwSession:
    """One ``StreamSecrets`` (or ``FetchSecrets``) stream's state."""

    def __init__(self, *, nonce_prefix: str = "") -> None:
        self._nonces = _Nonces(nonce_prefix)
        self._names: tuple[str, ...] | None = None
        self._sent: _Sent | None = None
        self._demand = False
        self._accepted = ""

    @property
    def names(self) -> tuple[str, ...] | None:
        """The subscription (empty: everything); ``None`` before the first request."""
        return self._names

    @property
    def accepted_version(self) -> str:
        """The last version the client ACKed (or reported on reconnect); ``""`` if none."""
        return self._accepted

    @property
    def awaiting_response(self) -> bool:
        """A request must be answered with the full state, whether it changed or not."""
        return self._demand

    def receive(self, request: SotwRequest) -> tuple[Event, ...]:
        if not request.nonce:  # a new stream (or a reconnect): answer with the full state
            previous = self._names
            self._names = request.names
            self._demand = True
            if request.version_info and previous is None:
                self._accepted = request.version_info
            return (Subscribed(names=request.names, previous=previous, client_version=request.version_info),)
        sent = self._sent
        if sent is None or request.nonce != sent.nonce:
            return (StaleNonce(nonce=request.nonce),)
        events: list[Event] = []
        if request.error is not None:
            events.append(
                Nacked(
                    version=sent.version, nonce=sent.nonce, kept_version=request.version_info, rejection=request.error
                )
            )
        else:
            self._accepted = sent.version
            events.append(Acked(version=sent.version, nonce=sent.nonce))
        if request.names != self._names:
            events.append(Subscribed(names=request.names, previous=self._names, client_version=request.version_info))
            self._names = request.names
            self._demand = True
        return tuple(events)

    def respond(self, resources: Mapping[str, str]) -> SotwResponse | None:
        """What to send, given the current ``resources`` of the subscription (name → version).

        ``None`` when nothing was asked for and the content is what was last sent.
        """
        if self._names is None:
            raise SessionUsageError("sds session: respond() before the first request")
        versions = dict(resources)
        if not self._demand and self._sent is not None and self._sent.versions == versions:
            return None
        version = content_version(versions)
        nonce = self._nonces.next()
        self._sent = _Sent(version, nonce, versions)
        self._demand = False
        return SotwResponse(version=version, nonce=nonce, names=tuple(versions))


# --- incremental ---------------------------------------------------------------------------------------


class DeltaSession:
    """One ``DeltaSecrets`` stream's state."""

    def __init__(self, *, nonce_prefix: str = "") -> None:
        self._nonces = _Nonces(nonce_prefix)
        self._started = False
        self._wildcard = False
        self._subscribed: dict[str, None] = {}  # ordered set
        self._known: dict[str, str] = {}  # what the client has (or was last sent), by name
        self._last_nonce = ""
        self._last_system_version = ""

    @property
    def started(self) -> bool:
        """The first request has been received."""
        return self._started

    @property
    def wildcard(self) -> bool:
        return self._wildcard

    @property
    def names(self) -> tuple[str, ...]:
        """The names subscribed explicitly (with :attr:`wildcard`, every resource besides)."""
        return tuple(self._subscribed)

    @property
    def known(self) -> Mapping[str, str]:
        """The version of each resource the client has, as far as this session knows."""
        return dict(self._known)

    def receive(self, request: DeltaRequest) -> tuple[Event, ...]:
        overlap = set(request.subscribe) & set(request.unsubscribe)
        if overlap:
            raise ProtocolViolation(f"names both subscribed and unsubscribed in one request: {sorted(overlap)}")
        events: list[Event] = []
        if not self._started:
            if request.nonce:
                raise ProtocolViolation("the first request of a stream must not carry a response nonce")
            self._started = True
            self._wildcard = not request.subscribe or WILDCARD in request.subscribe
            self._subscribe(request.subscribe)
            self._known = {
                name: version
                for name, version in request.initial_versions.items()
                if self._wildcard or name in self._subscribed
            }
            events.append(
                DeltaSubscribed(
                    subscribed=self.names,
                    unsubscribed=(),
                    wildcard=self._wildcard,
                    initial_versions=dict(request.initial_versions),
                )
            )
            return tuple(events)
        if request.initial_versions:
            raise ProtocolViolation("initial_resource_versions is only allowed in the first request of a stream")
        if request.nonce:
            if request.nonce != self._last_nonce:
                events.append(StaleNonce(nonce=request.nonce))
            elif request.error is not None:
                events.append(
                    Nacked(
                        version=self._last_system_version,
                        nonce=request.nonce,
                        kept_version="",
                        rejection=request.error,
                    )
                )
            else:
                events.append(Acked(version=self._last_system_version, nonce=request.nonce))
        # Subscription changes count whatever the nonce says: they are not answers to a response.
        added = tuple(n for n in dict.fromkeys(request.subscribe) if n != WILDCARD and n not in self._subscribed)
        removed = tuple(n for n in dict.fromkeys(request.unsubscribe) if n != WILDCARD and n in self._subscribed)
        wildcard = self._wildcard
        if WILDCARD in request.subscribe:
            wildcard = True
        if WILDCARD in request.unsubscribe:
            wildcard = False
        if added or removed or wildcard != self._wildcard:
            self._wildcard = wildcard
            self._subscribe(added)
            for name in removed:
                del self._subscribed[name]
            if not wildcard:  # forget what is no longer covered: a re-subscription is answered in full
                self._known = {name: v for name, v in self._known.items() if name in self._subscribed}
            events.append(DeltaSubscribed(subscribed=added, unsubscribed=removed, wildcard=wildcard))
        return tuple(events)

    def _subscribe(self, names: Iterable[str]) -> None:
        for name in names:
            if name != WILDCARD:
                self._subscribed[name] = None

    def respond(self, resources: Mapping[str, str]) -> DeltaResponse | None:
        """What to send, given the current ``resources`` the subscription covers (name → version).

        Resources the client lacks or has at another version are sent; those it has that are no
        longer among ``resources`` are removed. ``None`` when there is nothing to tell, except for
        the first response of a stream, which is always sent (possibly empty).
        """
        if not self._started:
            raise SessionUsageError("sds session: respond() before the first request")
        updated = {name: version for name, version in resources.items() if self._known.get(name) != version}
        removed = tuple(name for name in self._known if name not in resources)
        first = not self._last_nonce
        if not updated and not removed and not first:
            return None
        for name in removed:
            del self._known[name]
        self._known.update(updated)
        self._last_nonce = self._nonces.next()
        self._last_system_version = content_version(resources)
        return DeltaResponse(
            system_version=self._last_system_version, nonce=self._last_nonce, updated=updated, removed=removed
        )
