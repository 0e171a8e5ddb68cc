"""Keys shared by the CA tests: generated once per session, since RSA generation is slow."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from controlplane.ca.keys import KeyType, SigningKey, generate_key
from spiffecore import TrustDomain

TD = TrustDomain.parse("example.org")
T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="session")
def keys() -> dict[KeyType, SigningKey]:
    """One key of each type the CA creates."""
    return {key_type: generate_key(key_type) for key_type in KeyType}
