"""The bundle: every server's X.509 roots and JWT keys, with a sequence number bumped per change."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.store import Store, StoreError
from spiffecore import JWTPublicKey
from tests.controlplane.store.support import NOW, TD
from tests.support.ca import TestCA


def root(*, not_after: datetime = NOW + timedelta(days=1)) -> TestCA:
    return TestCA.create(not_before=NOW - timedelta(days=1), not_after=not_after)


def jwt_key() -> JWTPublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


def test_new_store_has_an_empty_bundle_at_sequence_zero(store: Store) -> None:
    bundle = store.get_bundle(TD)

    assert store.bundle_sequence() == 0
    assert bundle.sequence == 0
    assert bundle.x509.authorities == ()
    assert dict(bundle.jwt.authorities) == {}


def test_bundle_holds_every_servers_authorities(store: Store) -> None:
    ca_a, ca_b = root(not_after=NOW + timedelta(days=2)), root(not_after=NOW + timedelta(days=1))
    key_a, key_b = jwt_key(), jwt_key()

    assert store.add_x509_authority("server-a", ca_a.cert)
    assert store.add_x509_authority("server-b", ca_b.cert)
    assert store.add_jwt_authority("server-a", "kid-a", key_a, NOW + timedelta(days=1))
    assert store.add_jwt_authority("server-b", "kid-b", key_b, NOW + timedelta(days=1))

    bundle = store.get_bundle(TD)
    assert bundle.trust_domain == TD
    assert bundle.sequence == 4
    assert bundle.x509.authorities == (ca_b.cert, ca_a.cert)  # by expiry
    assert dict(bundle.jwt.authorities) == {"kid-a": key_a, "kid-b": key_b}


def test_adding_an_authority_again_changes_nothing(store: Store) -> None:
    ca, key = root(), jwt_key()
    store.add_x509_authority("server-a", ca.cert)
    store.add_jwt_authority("server-a", "kid", key, NOW)

    assert not store.add_x509_authority("server-a", ca.cert)
    assert not store.add_jwt_authority("server-a", "kid", key, NOW)

    assert store.bundle_sequence() == 2
    assert len(store.get_bundle(TD).x509.authorities) == 1


def test_a_key_id_cannot_name_two_keys(store: Store) -> None:
    store.add_jwt_authority("server-a", "kid", jwt_key(), NOW)

    with pytest.raises(StoreError) as caught:
        store.add_jwt_authority("server-b", "kid", jwt_key(), NOW)

    assert str(caught.value) == 'store: JWT authority key ID already names a different key: "kid"'
    assert store.bundle_sequence() == 1


def test_remove_expired_authorities(store: Store) -> None:
    old, new = root(not_after=NOW - timedelta(hours=1)), root(not_after=NOW + timedelta(days=1))
    store.add_x509_authority("a", old.cert)
    store.add_x509_authority("b", new.cert)
    store.add_jwt_authority("a", "old", jwt_key(), NOW - timedelta(hours=1))
    store.add_jwt_authority("b", "new", jwt_key(), NOW + timedelta(hours=1))

    assert store.remove_expired_authorities(NOW) == 2
    assert store.remove_expired_authorities(NOW) == 0

    bundle = store.get_bundle(TD)
    assert bundle.x509.authorities == (new.cert,)
    assert list(bundle.jwt.authorities) == ["new"]
    assert bundle.sequence == 5  # four additions and one removal; the empty removal is no change
