"""Our client and X509Source against the real service on a unix socket."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from sidecar.workload.client import WorkloadAPIClient, WorkloadAPIError
from sidecar.workload.service import WorkloadAPIService
from sidecar.workload.source import Backoff, X509Source, X509SourceError
from spiffecore import BundleNotFoundError, SpiffeID, TrustDomain, verify_x509_svid
from tests.sidecar.workload.conftest import PARTNER, Served, start_server
from tests.sidecar.workload.support import CallerBox, StaticAttestor
from tests.support.ca import TestCA

EXAMPLE = TrustDomain.parse("example.org")
PARTNER_TD = TrustDomain.parse(PARTNER)


async def test_fetch_x509_context(served: Served, ca: TestCA, partner_ca: TestCA) -> None:
    async with WorkloadAPIClient(served.address) as client:
        context = await client.fetch_x509_context()
    expected = served.identities.x509_context(served.attestor.selectors)
    assert context == expected
    assert [svid.private_key.public_key() for svid in context.svids] == [
        e.svid.private_key.public_key() for e in served.identities.entries
    ]
    assert context.bundle == ca.x509_bundle()
    assert dict(context.federated) == {PARTNER_TD: partner_ca.x509_bundle()}


async def test_watch_x509_context_sees_rotation(served: Served) -> None:
    async with WorkloadAPIClient(served.address) as client:
        watch = client.watch_x509_context()
        first = await anext(watch)
        rotated = served.identities.rotate(1)
        second = await anext(watch)
        await watch.aclose()
    assert first.svids[1] != rotated
    assert second.svids[1] == rotated
    assert second.svids[0] == first.svids[0]


async def test_bundles(served: Served, ca: TestCA, partner_ca: TestCA) -> None:
    async with WorkloadAPIClient(served.address) as client:
        x509 = await client.fetch_x509_bundles()
        jwt = await client.fetch_jwt_bundles()
        x509_watch = client.watch_x509_bundles()
        jwt_watch = client.watch_jwt_bundles()
        assert await anext(x509_watch) == x509
        assert await anext(jwt_watch) == jwt
        await x509_watch.aclose()
        await jwt_watch.aclose()
    assert dict(x509) == {EXAMPLE: ca.x509_bundle(), PARTNER_TD: partner_ca.x509_bundle()}
    assert dict(jwt) == {EXAMPLE: ca.bundle().jwt, PARTNER_TD: partner_ca.bundle().jwt}


async def test_jwt_svid_fetch_and_validate(served: Served, partner_ca: TestCA) -> None:
    async with WorkloadAPIClient(served.address) as client:
        svid = await client.fetch_jwt_svid("db")
        svids = await client.fetch_jwt_svids(["db", "cache"])
        ext = await client.fetch_jwt_svid("db", SpiffeID.parse("spiffe://example.org/web-ext"))
        validated = await client.validate_jwt_svid(svid.token, "db")
        foreign = await client.validate_jwt_svid(
            partner_ca.mint_jwt("/api", now=datetime.now(UTC), audience="db"), "db"
        )
    assert svid.id == SpiffeID.parse("spiffe://example.org/web")
    assert svid.hint == "internal"
    assert [s.id.path for s in svids] == ["/web", "/web-ext"]
    assert all(s.audience == ("db", "cache") for s in svids)
    assert ext.id.path == "/web-ext"
    assert (validated.id, validated.token) == (svid.id, svid.token)
    assert foreign.id == SpiffeID.parse("spiffe://partner.org/api")


async def test_errors_carry_the_grpc_code(served: Served, ca: TestCA) -> None:
    async with WorkloadAPIClient(served.address) as client:
        with pytest.raises(WorkloadAPIError) as caught:
            await client.validate_jwt_svid(ca.mint_jwt("/db", now=datetime.now(UTC), audience="x"), "db")
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert str(caught.value).startswith(
            'workloadapi: INVALID_ARGUMENT: jwtsvid: token audience does not include "db"'
        )
        served.attestor.selectors = frozenset()
        with pytest.raises(WorkloadAPIError) as caught:
            await client.fetch_x509_context()
        assert str(caught.value) == "workloadapi: PERMISSION_DENIED: no identity issued"
        with pytest.raises(WorkloadAPIError) as caught:
            await client.fetch_jwt_svid([])
        assert str(caught.value) == "workloadapi: INVALID_ARGUMENT: audience must be specified"


async def test_no_server_is_unavailable(tmp_path: Path) -> None:
    async with WorkloadAPIClient(f"unix://{tmp_path}/none.sock", timeout=5) as client:
        with pytest.raises(WorkloadAPIError) as caught:
            await client.fetch_x509_bundles()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_client_must_be_opened() -> None:
    client = WorkloadAPIClient("unix:///tmp/x.sock")
    with pytest.raises(RuntimeError, match="not open"):
        await client.fetch_x509_context()


async def test_client_takes_the_address_from_the_environment(served: Served) -> None:
    client = WorkloadAPIClient(environ={"SPIFFE_ENDPOINT_SOCKET": f"unix:{served.socket}"})
    assert client.target == f"unix:{served.socket}"
    async with client:
        assert (await client.fetch_x509_context()).svids


# --- X509Source ---------------------------------------------------------------------------------------------


async def test_x509_source_follows_rotation(served: Served, partner_ca: TestCA) -> None:
    async with WorkloadAPIClient(served.address) as client, X509Source(client.watch_x509_context) as source:
        with pytest.raises(X509SourceError, match=r"no X\.509 context received yet"):
            source.svid()
        await source.ready(timeout=10)
        updates = source.updates()
        assert (await anext(updates)) == source.context
        assert source.svid() == served.identities.entries[0].svid
        assert source.svid("external") == served.identities.entries[1].svid
        with pytest.raises(X509SourceError) as caught:
            source.svid("nope")
        assert str(caught.value) == 'x509source: no X.509-SVID with this hint: "nope"'
        assert source.bundles.x509_bundle_for(PARTNER_TD) == partner_ca.x509_bundle()
        with pytest.raises(BundleNotFoundError):
            source.bundles.x509_bundle_for(TrustDomain.parse("stranger.org"))
        verified = verify_x509_svid(source.svid().cert_chain, source.bundles, at=datetime.now(UTC))
        assert verified.id.path == "/web"
        rotated = served.identities.rotate(0)
        assert (await asyncio.wait_for(anext(updates), 10)).svids[0] == rotated
        assert source.svid() == rotated
    with pytest.raises(X509SourceError, match="the source is closed"):
        source.svid()
    assert await anext(updates, None) is None  # updates end when the source closes


async def test_x509_source_reconnects_after_server_restart(served: Served, ca: TestCA) -> None:
    backoff = Backoff(minimum=0.05, maximum=0.2, rng=random.Random(1))  # noqa: S311 - jitter, not cryptography
    async with (
        WorkloadAPIClient(served.address) as client,
        X509Source(client.watch_x509_context, backoff=backoff) as source,
    ):
        await source.ready(timeout=10)
        updates = source.updates()
        await anext(updates)
        await served.server.stop(None)
        rotated = served.identities.rotate(0)
        await asyncio.sleep(0.3)  # the watch breaks and retries against no server
        assert source.last_error is not None
        assert source.svid() != rotated  # the last context is kept meanwhile
        service = WorkloadAPIService(served.identities, CallerBox(), StaticAttestor())
        served.server = await start_server(served.socket, service)
        assert (await asyncio.wait_for(anext(updates), 20)).svids[0] == rotated
        assert source.last_error is None


async def test_x509_source_ready_times_out_with_the_reason(tmp_path: Path) -> None:
    backoff = Backoff(minimum=0.05, maximum=0.1)
    async with (
        WorkloadAPIClient(f"unix://{tmp_path}/none.sock") as client,
        X509Source(client.watch_x509_context, backoff=backoff) as source,
    ):
        with pytest.raises(X509SourceError) as caught:
            await source.ready(timeout=0.5)
    assert str(caught.value).startswith(
        "x509source: no X.509 context within 0.5 s (last error: workloadapi: UNAVAILABLE:"
    )


def test_backoff_is_jittered_exponential_within_bounds() -> None:
    backoff = Backoff(rng=random.Random(7))  # noqa: S311 - jitter, not cryptography
    delays = [backoff.next() for _ in range(12)]
    bounds = [min(30.0, 0.5 * 2**n) for n in range(12)]
    assert all(0.5 <= delay <= bound for delay, bound in zip(delays, bounds, strict=True))
    assert delays[0] == 0.5
    assert max(delays) > 8
    backoff.reset()
    assert backoff.next() == 0.5
