"""Join tokens: single use (also under a race), expiry, and never a token in a message."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from controlplane.model import JoinToken
from controlplane.store import JoinTokenError, JoinTokenExpiredError, JoinTokenNotFoundError, Store
from spiffecore import SpiffeID
from tests.controlplane.store.support import NOW

SECRET = "s3cr3t-join-token-0123456789"


def test_consume_returns_the_token_once(store: Store) -> None:
    alias = SpiffeID.parse("spiffe://example.org/node/a")
    token = JoinToken(token=SECRET, expires_at=NOW + timedelta(minutes=10), alias=alias)
    store.create_join_token(token)

    assert store.consume_join_token(SECRET, NOW) == token
    with pytest.raises(JoinTokenNotFoundError) as caught:
        store.consume_join_token(SECRET, NOW)

    assert str(caught.value) == "store: join token is unknown or was already used"


def test_unknown_token(store: Store) -> None:
    with pytest.raises(JoinTokenNotFoundError) as caught:
        store.consume_join_token(SECRET, NOW)

    assert SECRET not in str(caught.value)


def test_expired_token_is_refused_and_deleted(store: Store) -> None:
    store.create_join_token(JoinToken(token=SECRET, expires_at=NOW))

    with pytest.raises(JoinTokenExpiredError) as caught:
        store.consume_join_token(SECRET, NOW)
    assert str(caught.value) == "store: join token has expired"
    with pytest.raises(JoinTokenNotFoundError):
        store.consume_join_token(SECRET, NOW - timedelta(hours=1))


def test_duplicate_token_is_refused_without_quoting_it(store: Store) -> None:
    token = JoinToken(token=SECRET, expires_at=NOW + timedelta(minutes=10))
    store.create_join_token(token)

    with pytest.raises(JoinTokenError) as caught:
        store.create_join_token(token)

    assert str(caught.value) == "store: join token already exists"


def test_tokens_are_stored_as_digests(store: Store) -> None:
    store.create_join_token(JoinToken(token=SECRET, expires_at=NOW + timedelta(minutes=10)))

    with store.engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT * FROM join_tokens").all()

    assert len(rows) == 1
    assert SECRET.encode() not in b"".join(
        bytes(v) if isinstance(v, bytes | memoryview) else str(v).encode() for v in rows[0]
    )


def test_remove_expired_join_tokens(store: Store) -> None:
    store.create_join_token(JoinToken(token=SECRET, expires_at=NOW))
    store.create_join_token(JoinToken(token=SECRET + "-2", expires_at=NOW + timedelta(hours=1)))

    assert store.remove_expired_join_tokens(NOW + timedelta(seconds=1)) == 1

    assert store.consume_join_token(SECRET + "-2", NOW).token == SECRET + "-2"


def test_racing_consumers_get_a_token_exactly_once(store_url: str) -> None:
    """Two servers (two Store instances, so two connection pools) race for each of 10 tokens."""
    tokens = [f"{SECRET}-{i}" for i in range(10)]
    with Store.open(store_url) as first, Store.open(store_url, migrate=False) as second:
        for token in tokens:
            first.create_join_token(JoinToken(token=token, expires_at=NOW + timedelta(minutes=10)))
        wins: list[str] = []
        losses: list[str] = []
        lock = threading.Lock()

        def consume(store: Store, token: str, barrier: threading.Barrier) -> None:
            barrier.wait()
            try:
                store.consume_join_token(token, NOW)
            except JoinTokenNotFoundError:
                with lock:
                    losses.append(token)
            else:
                with lock:
                    wins.append(token)

        for token in tokens:
            barrier = threading.Barrier(4)
            threads = [threading.Thread(target=consume, args=(s, token, barrier)) for s in (first, second) * 2]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    assert sorted(wins) == sorted(tokens)
    assert len(losses) == 3 * len(tokens)
