"""The CA's state on disk, in ``<data_dir>/ca/``: two slots per kind of authority, and a journal.

```
ca/                      0700
  journal.json           which slot is current and which is next, per kind; the JWT keys' IDs and times
  x509-a.crt.pem         the authority certificate, then its upstream chain (if any) up to the root
  x509-a.key.pem         0600
  jwt-a.key.pem          0600
  ... and the same for slot b
```

The journal is the commit point: a new authority's files are written first, then the journal
that names them, each file atomically. A crash in between leaves files no journal names, which
the next preparation overwrites. Whatever is named by the journal must load: a missing, corrupt or
half-written file is a :class:`CAError` naming it, never a reason to create new roots, which would
cut every workload of the trust domain off.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, cast

from cryptography import x509

from controlplane.ca.errors import CAError
from controlplane.ca.jwtca import JWTAuthority
from controlplane.ca.keys import load_private_key_pem, save_private_key
from controlplane.ca.x509ca import X509Authority
from spiffecore import SpiffeError, SpiffeIDError, TrustDomain
from spiffecore.der import CERTIFICATE_PARSE_ERRORS
from spiffeops.lifecycle import write_atomically

PUBLIC: Final = 0o644  # certificates and the journal hold nothing secret

SlotName = Literal["a", "b"]
SLOT_NAMES: Final[tuple[SlotName, SlotName]] = ("a", "b")
JOURNAL_NAME: Final = "journal.json"
JOURNAL_VERSION: Final = 1
MAX_FILE_BYTES: Final = 1024 * 1024

BAD_JOURNAL: Final = "could not parse CA journal"
JOURNAL_MISSING: Final = (
    "CA journal is missing but the directory holds CA files; restore the journal from a backup, or remove"
    " the directory to create new roots for the trust domain (every workload must then get the new bundle)"
)
WRONG_TRUST_DOMAIN: Final = "CA state belongs to another trust domain"
FILE_MISSING: Final = "CA file named by the journal is missing"
UNREADABLE: Final = "could not read CA file"
UNWRITABLE: Final = "could not write CA file"
BAD_CERTS: Final = "could not parse CA certificate file as PEM certificates"
TOO_LARGE: Final = "CA file is too large"
BAD_AUTHORITY: Final = "CA files do not make a usable authority"


def other_slot(slot: SlotName | None) -> SlotName:
    """The slot a new authority goes into when ``slot`` is current."""
    return "b" if slot == "a" else "a"


@dataclass(frozen=True, slots=True, kw_only=True)
class JWTRecord:
    """What the journal keeps of a JWT key besides the key file: its ID and validity."""

    kid: str
    issued_at: datetime
    not_after: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Journal:
    """Which slot holds the current and the next authority, for X.509 and for JWT."""

    trust_domain: TrustDomain
    x509_current: SlotName | None = None
    x509_next: SlotName | None = None
    jwt_current: SlotName | None = None
    jwt_next: SlotName | None = None
    jwt_keys: Mapping[SlotName, JWTRecord] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "jwt_keys", MappingProxyType(dict(self.jwt_keys)))
        for current, next_ in ((self.x509_current, self.x509_next), (self.jwt_current, self.jwt_next)):
            if current is not None and current == next_:
                raise ValueError(f"current and next must be different slots, not both {current!r}")
        for slot in (self.jwt_current, self.jwt_next):
            if slot is not None and slot not in self.jwt_keys:
                raise ValueError(f"JWT slot {slot!r} has no key record")

    def to_json(self) -> bytes:
        keys = {
            slot: {"kid": record.kid, "issued_at": _time(record.issued_at), "not_after": _time(record.not_after)}
            for slot, record in sorted(self.jwt_keys.items())
            if slot in (self.jwt_current, self.jwt_next)
        }
        document = {
            "version": JOURNAL_VERSION,
            "trust_domain": self.trust_domain.name,
            "x509": {"current": self.x509_current, "next": self.x509_next},
            "jwt": {"current": self.jwt_current, "next": self.jwt_next, "keys": keys},
        }
        return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes, *, source: str) -> Journal:
        """Parse a journal; every problem is a :class:`CAError` naming ``source`` and what is wrong."""
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            raise CAError(f"{BAD_JOURNAL} (not JSON: {err})", source) from err
        try:
            return cls._from_document(document)
        except (ValueError, KeyError, TypeError, SpiffeIDError) as err:
            reason = err.rule if isinstance(err, SpiffeError) else str(err.args[0] if err.args else err)
            raise CAError(f"{BAD_JOURNAL} ({reason})", source) from err

    @classmethod
    def _from_document(cls, document: Any) -> Journal:
        top = _object(document, "journal", {"version", "trust_domain", "x509", "jwt"})
        if top["version"] != JOURNAL_VERSION:
            raise ValueError(f"version must be {JOURNAL_VERSION}, not {top['version']!r}")
        if not isinstance(top["trust_domain"], str):
            raise TypeError("trust_domain must be a string")
        trust_domain = TrustDomain.parse(top["trust_domain"])
        x509_part = _object(top["x509"], "x509", {"current", "next"})
        jwt_part = _object(top["jwt"], "jwt", {"current", "next", "keys"})
        keys = _object(jwt_part["keys"], "jwt.keys", set(SLOT_NAMES), required=False)
        records = {_slot(slot, "jwt.keys"): _record(value, f"jwt.keys.{slot}") for slot, value in keys.items()}
        return cls(
            trust_domain=trust_domain,
            x509_current=_optional_slot(x509_part["current"], "x509.current"),
            x509_next=_optional_slot(x509_part["next"], "x509.next"),
            jwt_current=_optional_slot(jwt_part["current"], "jwt.current"),
            jwt_next=_optional_slot(jwt_part["next"], "jwt.next"),
            jwt_keys=records,
        )


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _object(value: Any, where: str, names: set[str], *, required: bool = True) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{where} must be an object")
    unknown = value.keys() - names
    if unknown:
        raise ValueError(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
    missing = names - value.keys() if required else set()
    if missing:
        raise ValueError(f"{where} is missing keys: {', '.join(sorted(missing))}")
    return value


def _slot(value: Any, where: str) -> SlotName:
    if value not in SLOT_NAMES:
        raise ValueError(f'{where} must be "a" or "b", not {value!r}')
    return cast(SlotName, value)


def _optional_slot(value: Any, where: str) -> SlotName | None:
    if value is None:
        return None
    if value not in SLOT_NAMES:
        raise ValueError(f'{where} must be "a", "b" or null, not {value!r}')
    return cast(SlotName, value)


def _parse_time(value: Any, where: str) -> datetime:
    if not isinstance(value, str):
        raise TypeError(f"{where} must be an ISO 8601 time string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{where} is not an ISO 8601 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{where} must carry a time zone: {value!r}")
    return parsed


def _record(value: Any, where: str) -> JWTRecord:
    fields = _object(value, where, {"kid", "issued_at", "not_after"})
    if not isinstance(fields["kid"], str):
        raise TypeError(f"{where}.kid must be a string")
    return JWTRecord(
        kid=fields["kid"],
        issued_at=_parse_time(fields["issued_at"], f"{where}.issued_at"),
        not_after=_parse_time(fields["not_after"], f"{where}.not_after"),
    )


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write into a :class:`CAError` naming the file."""
    try:
        yield
    except OSError as err:
        raise CAError(f"{UNWRITABLE} ({err.strerror or err})", str(path)) from err


@dataclass(frozen=True, slots=True)
class CADirectory:
    """The files of ``path`` (``<data_dir>/ca``). Every read error names the file."""

    path: Path

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL_NAME

    def x509_cert_path(self, slot: SlotName) -> Path:
        return self.path / f"x509-{slot}.crt.pem"

    def x509_key_path(self, slot: SlotName) -> Path:
        return self.path / f"x509-{slot}.key.pem"

    def jwt_key_path(self, slot: SlotName) -> Path:
        return self.path / f"jwt-{slot}.key.pem"

    def create(self) -> None:
        """Create the directory (0700) if it does not exist yet."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _read(self, path: Path) -> bytes:
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError as err:
            raise CAError(FILE_MISSING, str(path)) from err
        except OSError as err:
            raise CAError(f"{UNREADABLE} ({err.strerror or err})", str(path)) from err
        if len(data) > MAX_FILE_BYTES:
            raise CAError(f"{TOO_LARGE} (more than {MAX_FILE_BYTES} bytes)", str(path))
        return data

    def read_journal(self) -> Journal | None:
        """The journal, or ``None`` for a fresh directory; a missing journal beside CA files is an error."""
        if not self.journal_path.exists():
            leftovers = sorted(p.name for p in self.path.glob("*.pem")) if self.path.is_dir() else []
            if leftovers:
                raise CAError(f"{JOURNAL_MISSING} ({', '.join(leftovers)})", str(self.journal_path))
            return None
        return Journal.parse(self._read(self.journal_path), source=str(self.journal_path))

    def write_journal(self, journal: Journal) -> None:
        with _writing(self.journal_path):
            write_atomically(self.journal_path, journal.to_json(), mode=PUBLIC)

    def load_x509(self, slot: SlotName, trust_domain: TrustDomain) -> X509Authority:
        cert_path, key_path = self.x509_cert_path(slot), self.x509_key_path(slot)
        try:
            chain = tuple(x509.load_pem_x509_certificates(self._read(cert_path)))
        except CERTIFICATE_PARSE_ERRORS as err:
            raise CAError(BAD_CERTS, str(cert_path)) from err
        key = load_private_key_pem(self._read(key_path), source=str(key_path))
        try:
            return X509Authority(
                trust_domain=trust_domain, certificate=chain[0], private_key=key, upstream_chain=chain[1:]
            )
        except CAError as err:
            raise CAError(f"{BAD_AUTHORITY} ({err.rule}; key {key_path.name})", str(cert_path)) from err

    def save_x509(self, slot: SlotName, authority: X509Authority) -> None:
        with _writing(key_path := self.x509_key_path(slot)):
            save_private_key(key_path, authority.private_key)
        with _writing(cert_path := self.x509_cert_path(slot)):
            write_atomically(cert_path, authority.chain_pem(), mode=PUBLIC)

    def load_jwt(self, slot: SlotName, record: JWTRecord, trust_domain: TrustDomain) -> JWTAuthority:
        key_path = self.jwt_key_path(slot)
        key = load_private_key_pem(self._read(key_path), source=str(key_path))
        try:
            return JWTAuthority(
                trust_domain=trust_domain,
                kid=record.kid,
                private_key=key,
                issued_at=record.issued_at,
                not_after=record.not_after,
            )
        except CAError as err:
            raise CAError(f"{BAD_AUTHORITY} ({err.rule})", str(key_path)) from err

    def save_jwt(self, slot: SlotName, authority: JWTAuthority) -> None:
        with _writing(key_path := self.jwt_key_path(slot)):
            save_private_key(key_path, authority.private_key)


__all__ = ["SLOT_NAMES", "CADirectory", "JWTRecord", "Journal", "SlotName", "other_slot"]
