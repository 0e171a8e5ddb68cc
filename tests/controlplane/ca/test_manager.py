"""The CA manager with real files: creation, modes, restarts, a rotation walked through, corrupt state.

A small "publisher" plays the caller: it adds every prepared authority to the bundle it keeps, as
the server adds them to the store, so SVIDs are checked the way workloads will check them.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.ca.config import CAConfig
from controlplane.ca.errors import CAError
from controlplane.ca.jwtca import sign_jwt_svid
from controlplane.ca.keys import KeyType, PublicKey, SigningKey, dump_private_key_pem
from controlplane.ca.manager import CAEvent, CAEventKind, CAManager
from controlplane.ca.svid import sign_x509_svid
from spiffecore import JWTSVID, JWTBundle, SpiffeID, X509Bundle, verify_x509_svid
from spiffecore.der import dump_pem_certificates
from tests.controlplane.ca.conftest import T0, TD
from tests.support.ca import TestCA

H = timedelta(hours=1)
S = timedelta(seconds=1)
WEB = SpiffeID.parse("spiffe://example.org/web")
CONFIG = CAConfig(trust_domain=TD)
ALL_EVENTS = [
    CAEventKind.X509_PREPARED,
    CAEventKind.X509_ACTIVATED,
    CAEventKind.JWT_PREPARED,
    CAEventKind.JWT_ACTIVATED,
]
PREPARED = [CAEventKind.X509_PREPARED, CAEventKind.JWT_PREPARED]
ACTIVATED = [CAEventKind.X509_ACTIVATED, CAEventKind.JWT_ACTIVATED]


def _kinds(events: list[CAEvent]) -> list[CAEventKind]:
    return [event.kind for event in events]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclass
class Publisher:
    """The caller's bundle: every authority the manager ever offered, as the store would keep them."""

    roots: list[x509.Certificate] = field(default_factory=list)
    jwt_keys: dict[str, PublicKey] = field(default_factory=dict)

    def publish(self, manager: CAManager) -> None:
        self.roots.extend(root for root in manager.x509_roots() if root not in self.roots)
        self.jwt_keys.update(manager.jwt_public_keys())

    def x509_bundle(self) -> X509Bundle:
        return X509Bundle(trust_domain=TD, authorities=tuple(self.roots))

    def jwt_bundle(self) -> JWTBundle:
        return JWTBundle(trust_domain=TD, authorities=self.jwt_keys)


@pytest.fixture
def manager(tmp_path: Path) -> CAManager:
    return CAManager.load_or_create(tmp_path, CONFIG, now=T0)


# --- creation and restart --------------------------------------------------------------------------


def test_a_fresh_directory_gets_authorities_and_reports_them(tmp_path: Path) -> None:
    manager = CAManager.load_or_create(tmp_path, CONFIG, now=T0)
    events = manager.tick(T0)
    assert _kinds(events) == ALL_EVENTS
    assert events[0].authority_id == manager.x509_authority.subject_key_id.hex()
    assert events[2].authority_id == manager.jwt_authority.kid
    assert manager.tick(T0) == []
    assert manager.x509_authority.not_after == T0 + 24 * H
    assert manager.jwt_authority.not_after == T0 + 24 * H
    assert manager.next_x509_authority is None
    assert manager.next_jwt_authority is None
    assert manager.x509_roots() == (manager.x509_authority.certificate,)
    assert dict(manager.jwt_public_keys()) == {manager.jwt_authority.kid: manager.jwt_authority.public_key}


def test_files_and_their_modes(manager: CAManager, tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    assert _mode(ca) == 0o700
    modes = {path.name: _mode(path) for path in ca.iterdir()}
    assert modes == {
        "journal.json": 0o644,
        "x509-a.crt.pem": 0o644,
        "x509-a.key.pem": 0o600,
        "jwt-a.key.pem": 0o600,
    }
    journal = json.loads((ca / "journal.json").read_text())
    assert journal == {
        "version": 1,
        "trust_domain": "example.org",
        "x509": {"current": "a", "next": None},
        "jwt": {
            "current": "a",
            "next": None,
            "keys": {
                "a": {
                    "kid": manager.jwt_authority.kid,
                    "issued_at": "2030-01-01T00:00:00+00:00",
                    "not_after": "2030-01-02T00:00:00+00:00",
                }
            },
        },
    }
    assert (ca / "x509-a.key.pem").read_bytes() == dump_private_key_pem(manager.x509_authority.private_key)


def test_a_restart_keeps_the_roots_and_keys(manager: CAManager, tmp_path: Path) -> None:
    again = CAManager.load_or_create(tmp_path, CONFIG, now=T0 + H)
    assert again.tick(T0 + H) == []
    assert again.x509_authority.certificate == manager.x509_authority.certificate
    assert again.x509_authority.private_key.public_key() == manager.x509_authority.private_key.public_key()
    assert again.jwt_authority == manager.jwt_authority
    assert again.jwt_authority.public_key == manager.jwt_authority.public_key


def test_a_restart_keeps_a_prepared_next(manager: CAManager, tmp_path: Path) -> None:
    manager.tick(T0 + 12 * H)
    prepared = manager.next_x509_authority
    assert prepared is not None
    again = CAManager.load_or_create(tmp_path, CONFIG, now=T0 + 13 * H)
    assert again.tick(T0 + 13 * H) == []
    assert again.next_x509_authority == prepared
    assert again.next_jwt_authority == manager.next_jwt_authority
    assert _kinds(again.tick(T0 + 20 * H)) == ACTIVATED
    assert again.x509_authority == prepared


def test_state_of_another_trust_domain_is_refused(manager: CAManager, tmp_path: Path) -> None:
    from spiffecore import TrustDomain

    with pytest.raises(CAError) as info:
        CAManager.load_or_create(tmp_path, CAConfig(trust_domain=TrustDomain.parse("other.org")), now=T0)
    assert str(info.value) == (
        f"ca: CA state belongs to trust domain 'example.org', not 'other.org': \"{tmp_path}/ca/journal.json\""
    )


# --- rotation ----------------------------------------------------------------------------------


def test_rotation_through_lifetimes(manager: CAManager) -> None:
    first_x509, first_jwt = manager.x509_authority, manager.jwt_authority
    manager.tick(T0)
    # X.509 authorities are backdated 10 s, so their half-life comes 5 s before the JWT key's.
    assert manager.tick(T0 + 12 * H - 6 * S) == []
    assert _kinds(manager.tick(T0 + 12 * H - 5 * S)) == [CAEventKind.X509_PREPARED]
    assert _kinds(manager.tick(T0 + 12 * H)) == [CAEventKind.JWT_PREPARED]
    second_x509, second_jwt = manager.next_x509_authority, manager.next_jwt_authority
    assert second_x509 is not None
    assert second_jwt is not None
    assert manager.x509_authority == first_x509  # prepared, published, not signing yet
    assert manager.x509_roots() == (first_x509.certificate, second_x509.certificate)
    assert set(manager.jwt_public_keys()) == {first_jwt.kid, second_jwt.kid}
    assert manager.tick(T0 + 19 * H) == []
    events = manager.tick(T0 + 20 * H)
    assert _kinds(events) == ACTIVATED
    assert [event.authority_id for event in events] == [second_x509.subject_key_id.hex(), second_jwt.kid]
    assert manager.x509_authority == second_x509
    assert manager.jwt_authority == second_jwt
    assert manager.next_x509_authority is None
    assert manager.x509_roots() == (second_x509.certificate,)  # the caller keeps the old root until it expires
    assert _kinds(manager.tick(T0 + 24 * H)) == PREPARED
    assert _kinds(manager.tick(T0 + 32 * H)) == ACTIVATED


def test_after_a_long_outage_a_fresh_authority_takes_over_at_once(manager: CAManager, tmp_path: Path) -> None:
    manager.tick(T0)
    later = T0 + 100 * H
    again = CAManager.load_or_create(tmp_path, CONFIG, now=later)
    assert _kinds(again.tick(later)) == ALL_EVENTS
    assert again.x509_authority.not_after == later + 24 * H
    assert again.x509_authority != manager.x509_authority


def test_a_next_too_old_to_take_over_is_replaced(manager: CAManager, tmp_path: Path) -> None:
    manager.tick(T0 + 12 * H)
    stale = manager.next_x509_authority
    assert stale is not None
    later = T0 + 33 * H  # past the stale next's own activation time (32 h)
    again = CAManager.load_or_create(tmp_path, CONFIG, now=later)
    events = again.tick(later)
    assert _kinds(events) == ALL_EVENTS
    assert again.x509_authority != stale
    assert again.x509_authority.not_after == later + 24 * H
    journal = json.loads((tmp_path / "ca" / "journal.json").read_text())
    assert journal["x509"] == {"current": "b", "next": None}  # the stale next's slot was reused


def test_new_authorities_take_the_configured_key_types(manager: CAManager, tmp_path: Path) -> None:
    config = CAConfig(trust_domain=TD, key_type=KeyType.EC_P384, jwt_key_type=KeyType.EC_P384)
    again = CAManager.load_or_create(tmp_path, config, now=T0 + 12 * H)
    assert isinstance(again.x509_authority.private_key, ec.EllipticCurvePrivateKey)
    assert again.x509_authority.private_key.curve.name == "secp256r1"  # kept as it was
    prepared = again.next_x509_authority
    assert prepared is not None
    assert isinstance(prepared.private_key, ec.EllipticCurvePrivateKey)
    assert prepared.private_key.curve.name == "secp384r1"
    assert again.next_jwt_authority is not None
    assert again.next_jwt_authority.algorithm == "ES384"


def test_svids_signed_after_each_tick_get_the_max_ttl_and_verify_for_three_days(manager: CAManager) -> None:
    publisher = Publisher()
    ttl = 4 * H  # ca_ttl / 6
    key = ec.generate_private_key(ec.SECP256R1())
    now = T0
    while now < T0 + 72 * H:
        manager.tick(now)
        publisher.publish(manager)
        chain = sign_x509_svid(manager.x509_authority, spiffe_id=WEB, public_key=key.public_key(), ttl=ttl, now=now)
        assert chain[0].not_valid_after_utc == now + ttl
        for at in (now, now + ttl - S):
            verify_x509_svid(chain, publisher.x509_bundle(), at=at)
        token = sign_jwt_svid(manager.jwt_authority, spiffe_id=WEB, audience="db", ttl=ttl, now=now)
        JWTSVID.parse_and_validate(token, publisher.jwt_bundle(), "db", at=now + ttl - S)
        now += 37 * 60 * S  # at no special phase
    assert len(publisher.roots) == 6  # T0, then one each 12 h
    assert len(publisher.jwt_keys) == 6


# --- failures ----------------------------------------------------------------------------------


def test_events_of_a_step_taken_before_a_failure_are_not_lost(manager: CAManager, tmp_path: Path) -> None:
    manager.tick(T0)
    blocker = tmp_path / "ca" / "jwt-b.key.pem"
    blocker.mkdir()
    with pytest.raises(CAError) as info:
        manager.tick(T0 + 12 * H)
    assert str(info.value) == f'ca: could not write CA file (Is a directory): "{blocker}"'
    assert manager.next_x509_authority is not None
    assert manager.next_jwt_authority is None
    blocker.rmdir()
    assert _kinds(manager.tick(T0 + 12 * H)) == PREPARED
    assert [p.name for p in (tmp_path / "ca").iterdir() if p.name.startswith(".")] == []


def _corrupt_journal(ca: Path) -> None:
    (ca / "journal.json").write_text('{"version": 1, "trust_domain": "example.org", "x509": {"current": "a"')


def _unknown_key(ca: Path) -> None:
    document = json.loads((ca / "journal.json").read_text())
    document["x509"]["previous"] = "b"
    (ca / "journal.json").write_text(json.dumps(document))


def _bad_slot(ca: Path) -> None:
    document = json.loads((ca / "journal.json").read_text())
    document["x509"]["current"] = "c"
    (ca / "journal.json").write_text(json.dumps(document))


def _truncated_cert(ca: Path) -> None:
    data = (ca / "x509-a.crt.pem").read_bytes()
    (ca / "x509-a.crt.pem").write_bytes(data[: len(data) // 2])


def _missing_key(ca: Path) -> None:
    (ca / "x509-a.key.pem").unlink()


def _swapped_key(ca: Path) -> None:
    (ca / "x509-a.key.pem").write_bytes((ca / "jwt-a.key.pem").read_bytes())


def _missing_journal(ca: Path) -> None:
    (ca / "journal.json").unlink()


def _garbage_jwt_key(ca: Path) -> None:
    (ca / "jwt-a.key.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\n")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            _corrupt_journal,
            "ca: could not parse CA journal (not JSON: Expecting ',' delimiter: line 1 column 70 (char 69)):"
            ' "{ca}/journal.json"',
        ),
        (_unknown_key, 'ca: could not parse CA journal (x509 has unknown keys: previous): "{ca}/journal.json"'),
        (
            _bad_slot,
            'ca: could not parse CA journal (x509.current must be "a", "b" or null, not \'c\'): "{ca}/journal.json"',
        ),
        (_truncated_cert, 'ca: could not parse CA certificate file as PEM certificates: "{ca}/x509-a.crt.pem"'),
        (_missing_key, 'ca: CA file named by the journal is missing: "{ca}/x509-a.key.pem"'),
        (
            _swapped_key,
            "ca: CA files do not make a usable authority (private key does not match the authority certificate;"
            ' key x509-a.key.pem): "{ca}/x509-a.crt.pem"',
        ),
        (
            _missing_journal,
            "ca: CA journal is missing but the directory holds CA files; restore the journal from a backup, or remove"
            " the directory to create new roots for the trust domain (every workload must then get the new bundle)"
            ' (jwt-a.key.pem, x509-a.crt.pem, x509-a.key.pem): "{ca}/journal.json"',
        ),
        (_garbage_jwt_key, 'ca: could not parse private key as unencrypted PEM: "{ca}/jwt-a.key.pem"'),
    ],
)
def test_damaged_state_is_an_error_naming_the_file_and_nothing_is_regenerated(
    manager: CAManager, tmp_path: Path, damage: object, message: str
) -> None:
    ca = tmp_path / "ca"
    assert callable(damage)
    damage(ca)
    before = {path.name: path.read_bytes() for path in ca.iterdir()}
    with pytest.raises(CAError) as info:
        CAManager.load_or_create(tmp_path, CONFIG, now=T0 + H)
    assert str(info.value) == message.format(ca=ca)
    assert {path.name: path.read_bytes() for path in ca.iterdir()} == before


# --- upstream ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream_ca() -> TestCA:
    return TestCA.create("example.org", not_before=T0 - H, not_after=T0 + 1000 * H)


def _upstream_config(tmp_path: Path, ca: TestCA, key: SigningKey) -> CAConfig:
    cert_path, key_path = tmp_path / "upstream.crt", tmp_path / "upstream.key"
    cert_path.write_bytes(dump_pem_certificates((ca.cert,)))
    key_path.write_bytes(dump_private_key_pem(key))
    return CAConfig(trust_domain=TD, upstream_cert_path=cert_path, upstream_key_path=key_path)


def test_with_an_upstream_ca_the_bundle_holds_its_root(tmp_path: Path, upstream_ca: TestCA) -> None:
    config = _upstream_config(tmp_path, upstream_ca, upstream_ca.key)  # type: ignore[arg-type]
    manager = CAManager.load_or_create(tmp_path / "data", config, now=T0)
    intermediate = manager.x509_authority
    assert manager.x509_roots() == (upstream_ca.cert,)
    key = ec.generate_private_key(ec.SECP256R1())
    chain = sign_x509_svid(intermediate, spiffe_id=WEB, public_key=key.public_key(), ttl=H, now=T0)
    assert chain[1:] == (intermediate.certificate,)
    verify_x509_svid(chain, X509Bundle(trust_domain=TD, authorities=manager.x509_roots()), at=T0)
    manager.tick(T0 + 12 * H)
    assert manager.x509_roots() == (upstream_ca.cert,)  # both intermediates chain to the same root
    again = CAManager.load_or_create(tmp_path / "data", config, now=T0 + 13 * H)
    assert again.x509_authority == intermediate
    assert again.x509_authority.upstream_chain == (upstream_ca.cert,)


def test_an_unusable_upstream_stops_the_start(tmp_path: Path, upstream_ca: TestCA) -> None:
    config = _upstream_config(tmp_path, upstream_ca, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(CAError, match=r"^ca: upstream private key does not match the upstream certificate"):
        CAManager.load_or_create(tmp_path / "data", config, now=T0)
    assert not (tmp_path / "data" / "ca" / "journal.json").exists()


def test_an_upstream_gone_at_rotation_fails_the_tick_and_keeps_the_state(tmp_path: Path, upstream_ca: TestCA) -> None:
    config = _upstream_config(tmp_path, upstream_ca, upstream_ca.key)  # type: ignore[arg-type]
    manager = CAManager.load_or_create(tmp_path / "data", config, now=T0)
    manager.tick(T0)
    (tmp_path / "upstream.key").unlink()
    with pytest.raises(CAError, match=r"^ca: could not read upstream CA file \(No such file or directory\)"):
        manager.tick(T0 + 12 * H)
    assert manager.next_x509_authority is None
    assert manager.next_jwt_authority is None  # X.509 first; the JWT key follows on the next good tick


def test_now_must_be_aware(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="now must be a timezone-aware datetime"):
        CAManager.load_or_create(tmp_path, CONFIG, now=datetime(2030, 1, 1))
