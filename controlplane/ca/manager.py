"""The CA manager: the current and next X.509 authority and JWT key, rotated and persisted.

Each kind of authority has two slots, current and next. :meth:`CAManager.tick` asks the pure
schedule (:func:`controlplane.ca.schedule.next_action`) what each kind needs at ``now`` and
carries it out, persisting every step (:mod:`controlplane.ca.state`) before it takes effect in
memory. Run ``tick`` before each signing (it is a few comparisons when nothing is due) and
periodically (SPIRE: every 10 s), so that a prepared authority is published long before it signs.

Events are never lost: they queue in the manager and each ``tick`` hands out all queued so far,
including those of a step taken before a later step failed, and those of the start-up
(:meth:`CAManager.load_or_create` creates or rotates what the stored state needs). The caller
publishes them: a prepared authority goes into the trust domain's bundle at once. The manager is
not thread-safe; drive it from one task.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Final, Generic, TypeVar

from cryptography import x509

from controlplane.ca.config import CAConfig
from controlplane.ca.errors import CAError
from controlplane.ca.jwtca import JWTAuthority, create_jwt_authority
from controlplane.ca.keys import PublicKey, generate_key
from controlplane.ca.schedule import Action, Window, next_action, require_aware
from controlplane.ca.state import CADirectory, Journal, JWTRecord, SlotName, other_slot
from controlplane.ca.upstream import Upstream
from controlplane.ca.x509ca import X509Authority, create_intermediate, create_self_signed

CA_DIRECTORY: Final = "ca"
# The schedule settles in at most three steps (replace a stale next, activate it, prepare again).
_MAX_STEPS: Final = 4


class CAEventKind(enum.Enum):
    X509_PREPARED = "x509-prepared"
    """A new X.509 authority is ready: publish its roots in the bundle now."""
    X509_ACTIVATED = "x509-activated"
    """The prepared X.509 authority signs from now on."""
    JWT_PREPARED = "jwt-prepared"
    """A new JWT key is ready: publish it in the bundle now."""
    JWT_ACTIVATED = "jwt-activated"
    """The prepared JWT key signs from now on."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CAEvent:
    """A step of the rotation. ``authority_id`` is the subject key ID in hex (X.509) or the key ID (JWT)."""

    kind: CAEventKind
    authority_id: str
    not_after: datetime


A = TypeVar("A", X509Authority, JWTAuthority)


@dataclass(frozen=True, slots=True)
class _Slot(Generic[A]):
    name: SlotName
    authority: A


@dataclass(frozen=True, slots=True)
class _Pair(Generic[A]):
    current: _Slot[A] | None = None
    next: _Slot[A] | None = None


def _window(slot: _Slot[A] | None) -> Window | None:
    return None if slot is None else slot.authority.window


def _x509_id(authority: X509Authority) -> str:
    return authority.subject_key_id.hex()


def _jwt_id(authority: JWTAuthority) -> str:
    return authority.kid


class CAManager:
    """The CA's authorities and their rotation. Build it with :meth:`load_or_create`."""

    def __init__(
        self,
        *,
        directory: CADirectory,
        config: CAConfig,
        x509_slots: _Pair[X509Authority],
        jwt_slots: _Pair[JWTAuthority],
    ) -> None:
        self._directory = directory
        self._config = config
        self._x509 = x509_slots
        self._jwt = jwt_slots
        self._pending: list[CAEvent] = []

    @classmethod
    def load_or_create(cls, data_dir: Path, config: CAConfig, *, now: datetime) -> CAManager:
        """Load the authorities kept in ``<data_dir>/ca``, creating or rotating what ``now`` needs.

        A fresh directory gets its first authorities. Stored ones are kept as they are (the trust
        domain's roots survive restarts); any stored file that cannot be loaded is a
        :class:`CAError` naming it. An upstream CA, if configured, is checked now.
        """
        require_aware(now)
        directory = CADirectory(data_dir / CA_DIRECTORY)
        directory.create()
        if config.upstream_paths is not None:
            Upstream.load(*config.upstream_paths, now=now, ca_ttl=config.ca_ttl)
        journal = directory.read_journal()
        trust_domain = config.trust_domain
        if journal is None:
            journal = Journal(trust_domain=trust_domain)
            directory.write_journal(journal)
        elif journal.trust_domain != trust_domain:
            raise CAError(
                f"CA state belongs to trust domain {journal.trust_domain.name!r}, not {trust_domain.name!r}",
                str(directory.journal_path),
            )

        def x509_slot(name: SlotName | None) -> _Slot[X509Authority] | None:
            return None if name is None else _Slot(name, directory.load_x509(name, trust_domain))

        def jwt_slot(name: SlotName | None) -> _Slot[JWTAuthority] | None:
            if name is None:
                return None
            return _Slot(name, directory.load_jwt(name, journal.jwt_keys[name], trust_domain))

        manager = cls(
            directory=directory,
            config=config,
            x509_slots=_Pair(x509_slot(journal.x509_current), x509_slot(journal.x509_next)),
            jwt_slots=_Pair(jwt_slot(journal.jwt_current), jwt_slot(journal.jwt_next)),
        )
        manager._rotate(now)
        return manager

    # --- rotation ---------------------------------------------------------------------------

    def tick(self, now: datetime) -> list[CAEvent]:
        """Take every rotation step due at ``now``; return the events since the last call.

        If a step fails (an unreadable upstream CA, a full disk), the error propagates, the state
        stays as it was before that step, and the events of the steps already taken come with
        the next call.
        """
        self._rotate(now)
        events, self._pending = self._pending, []
        return events

    def _rotate(self, now: datetime) -> None:
        require_aware(now)
        self._x509 = self._rotate_kind(
            self._x509,
            now,
            create=self._create_x509,
            save=self._directory.save_x509,
            commit=lambda pair: self._commit(pair, self._jwt),
            ids=_x509_id,
            kinds=(CAEventKind.X509_PREPARED, CAEventKind.X509_ACTIVATED),
        )
        self._jwt = self._rotate_kind(
            self._jwt,
            now,
            create=self._create_jwt,
            save=self._directory.save_jwt,
            commit=lambda pair: self._commit(self._x509, pair),
            ids=_jwt_id,
            kinds=(CAEventKind.JWT_PREPARED, CAEventKind.JWT_ACTIVATED),
        )

    def _rotate_kind(
        self,
        pair: _Pair[A],
        now: datetime,
        *,
        create: Callable[[datetime], A],
        save: Callable[[SlotName, A], None],
        commit: Callable[[_Pair[A]], None],
        ids: Callable[[A], str],
        kinds: tuple[CAEventKind, CAEventKind],
    ) -> _Pair[A]:
        prepared, activated = kinds
        for _ in range(_MAX_STEPS):
            action = next_action(_window(pair.current), _window(pair.next), now)
            if action is Action.NOTHING:
                return pair
            if action is Action.PREPARE:
                authority = create(now)
                if pair.next is not None:  # a stale next: unname it before its files are overwritten
                    name = pair.next.name
                    pair = _Pair(pair.current, None)
                    commit(pair)
                else:
                    name = other_slot(None if pair.current is None else pair.current.name)
                save(name, authority)
                pair = _Pair(pair.current, _Slot(name, authority))
                commit(pair)
                self._pending.append(CAEvent(kind=prepared, authority_id=ids(authority), not_after=authority.not_after))
            else:
                promoted = pair.next
                assert promoted is not None  # next_action activates only a prepared slot
                pair = _Pair(promoted, None)
                commit(pair)
                authority = promoted.authority
                self._pending.append(
                    CAEvent(kind=activated, authority_id=ids(authority), not_after=authority.not_after)
                )
        raise CAError(f"rotation did not settle in {_MAX_STEPS} steps (a bug in the schedule)", now.isoformat())

    def _commit(self, x509_slots: _Pair[X509Authority], jwt_slots: _Pair[JWTAuthority]) -> None:
        """Persist the journal for these slots, then adopt them in memory."""
        jwt_keys = {
            slot.name: JWTRecord(
                kid=slot.authority.kid, issued_at=slot.authority.issued_at, not_after=slot.authority.not_after
            )
            for slot in (jwt_slots.current, jwt_slots.next)
            if slot is not None
        }
        journal = Journal(
            trust_domain=self._config.trust_domain,
            x509_current=None if x509_slots.current is None else x509_slots.current.name,
            x509_next=None if x509_slots.next is None else x509_slots.next.name,
            jwt_current=None if jwt_slots.current is None else jwt_slots.current.name,
            jwt_next=None if jwt_slots.next is None else jwt_slots.next.name,
            jwt_keys=jwt_keys,
        )
        self._directory.write_journal(journal)
        self._x509, self._jwt = x509_slots, jwt_slots

    def _create_x509(self, now: datetime) -> X509Authority:
        config = self._config
        key = generate_key(config.key_type)
        if config.upstream_paths is None:
            return create_self_signed(config.trust_domain, key, ttl=config.ca_ttl, now=now)
        # Read afresh each time, so a renewed upstream CA is picked up without a restart.
        upstream = Upstream.load(*config.upstream_paths, now=now, ca_ttl=config.ca_ttl)
        return create_intermediate(config.trust_domain, key, upstream, ttl=config.ca_ttl, now=now)

    def _create_jwt(self, now: datetime) -> JWTAuthority:
        config = self._config
        return create_jwt_authority(config.trust_domain, generate_key(config.jwt_key_type), ttl=config.ca_ttl, now=now)

    # --- accessors --------------------------------------------------------------------------

    @property
    def config(self) -> CAConfig:
        return self._config

    @property
    def x509_authority(self) -> X509Authority:
        """The X.509 authority that signs now. Run :meth:`tick` first with the signing time."""
        if self._x509.current is None:  # pragma: no cover - load_or_create always activates one
            raise CAError("no active X.509 authority")
        return self._x509.current.authority

    @property
    def jwt_authority(self) -> JWTAuthority:
        """The JWT key that signs now. Run :meth:`tick` first with the signing time."""
        if self._jwt.current is None:  # pragma: no cover - load_or_create always activates one
            raise CAError("no active JWT authority")
        return self._jwt.current.authority

    @property
    def next_x509_authority(self) -> X509Authority | None:
        return None if self._x509.next is None else self._x509.next.authority

    @property
    def next_jwt_authority(self) -> JWTAuthority | None:
        return None if self._jwt.next is None else self._jwt.next.authority

    def x509_roots(self) -> tuple[x509.Certificate, ...]:
        """The X.509 roots to publish: the current authority's and the prepared next one's, without repeats."""
        roots: dict[x509.Certificate, None] = {}
        for slot in (self._x509.current, self._x509.next):
            if slot is not None:
                roots.update(dict.fromkeys(slot.authority.roots))
        return tuple(roots)

    def jwt_public_keys(self) -> Mapping[str, PublicKey]:
        """The JWT keys to publish, by key ID: the current key and the prepared next one."""
        return MappingProxyType(
            {
                slot.authority.kid: slot.authority.public_key
                for slot in (self._jwt.current, self._jwt.next)
                if slot is not None
            }
        )


__all__ = ["CA_DIRECTORY", "CAEvent", "CAEventKind", "CAManager"]
