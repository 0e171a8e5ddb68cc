"""Round trips between the control plane's values and its wire messages; bad wire input is refused."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from controlplane.api.convert import bundle_from_proto, bundle_to_proto, entry_from_proto, entry_to_proto
from controlplane.model import ModelError, RegistrationEntry, Selector
from spiffecore import SpiffeID, TrustDomain
from spiffeproto import types_pb2
from tests.support.ca import TestCA


def test_entry_round_trip() -> None:
    entry = RegistrationEntry(
        id="e1",
        spiffe_id=SpiffeID.parse("spiffe://example.org/web"),
        parent_id=SpiffeID.parse("spiffe://example.org/spire/agent/x509pop/abc"),
        selectors=(Selector.parse("unix:uid:1000"), Selector.parse("unix:gid:10")),
        x509_svid_ttl=600,
        jwt_svid_ttl=60,
        dns_names=("web.example.org",),
        federates_with=(TrustDomain.parse("other.org"),),
        admin=True,
        downstream=True,
        hint="internal",
        expires_at=datetime(2030, 1, 1, tzinfo=UTC),
        revision=7,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert entry_from_proto(entry_to_proto(entry)) == entry


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (
            types_pb2.Entry(spiffe_id="not an id", parent_id="spiffe://td/a"),
            "entry: spiffe_id is not a valid SPIFFE ID",
        ),
        (types_pb2.Entry(spiffe_id="spiffe://td/a", parent_id=""), "entry: parent_id is not a valid SPIFFE ID"),
        (
            types_pb2.Entry(
                spiffe_id="spiffe://td/a",
                parent_id="spiffe://td/b",
                selectors=[types_pb2.Selector(type="unix", value="uid:1")],
                federates_with=["Bad"],
            ),
            "entry: federates_with is not a trust domain",
        ),
        (types_pb2.Entry(spiffe_id="spiffe://td/a", parent_id="spiffe://td/b"), "entry: entry must have at least one"),
        (
            types_pb2.Entry(
                spiffe_id="spiffe://td/a",
                parent_id="spiffe://td/b",
                selectors=[types_pb2.Selector(type="unix", value="uid:1")],
                expires_at=2**62,
            ),
            "entry: time is out of range",
        ),
    ],
)
def test_bad_wire_entries_are_model_errors(message: types_pb2.Entry, error: str) -> None:
    with pytest.raises(ModelError) as caught:
        entry_from_proto(message)
    assert str(caught.value).startswith(error)


def test_bundle_round_trip() -> None:
    bundle = TestCA.create("example.org").bundle(sequence=3)
    again = bundle_from_proto(bundle_to_proto(bundle))
    assert again.x509 == bundle.x509
    assert again.jwt == bundle.jwt
    assert again.sequence == 3
