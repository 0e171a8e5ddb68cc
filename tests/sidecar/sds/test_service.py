"""The SDS servicer over a real grpc.aio server on a unix socket, called with raw xDS stubs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2  # type: ignore[import-untyped]
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2  # type: ignore[import-untyped]
from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped]
from envoy.service.secret.v3 import sds_pb2_grpc  # type: ignore[import-untyped]
from google.protobuf import struct_pb2
from google.rpc import status_pb2  # type: ignore[import-untyped]

from sidecar.agent.attestors.base import WorkloadAttestationError
from sidecar.sds.resources import SECRET_TYPE_URL, SPIFFE_VALIDATOR
from sidecar.sds.service import SecretDiscoveryService, add_to_server
from sidecar.sds.session import content_version
from spiffecore import TrustDomain
from tests.sidecar.workload.support import CallerBox, FakeIdentities, StaticAttestor
from tests.support.ca import TestCA

WEB = "spiffe://example.org/web"
WEB_EXT = "spiffe://example.org/web-ext"
QUIET = 0.2  # how long "nothing is sent" is watched for


@dataclass
class Served:
    socket: Path
    identities: FakeIdentities
    caller: CallerBox
    attestor: StaticAttestor
    server: grpc.aio.Server
    channel: grpc.aio.Channel

    @property
    def stub(self) -> Any:
        return sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel)


@pytest.fixture
def identities() -> FakeIdentities:
    fake = FakeIdentities(
        TestCA.create("example.org"), {TrustDomain.parse("partner.org"): TestCA.create("partner.org")}
    )
    fake.add_entry("/web", hint="internal")
    fake.add_entry("/web-ext", hint="external", federates_with=("partner.org",))
    fake.add_entry("/db", selectors=frozenset({"unix:uid:2000"}))
    return fake


@pytest.fixture
async def served(tmp_path: Path, identities: FakeIdentities) -> AsyncIterator[Served]:
    caller = CallerBox()
    attestor = StaticAttestor()
    socket = tmp_path / "sds.sock"
    server = grpc.aio.server()
    add_to_server(SecretDiscoveryService(identities, caller, attestor), server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        yield Served(socket, identities, caller, attestor, server, channel)
    await server.stop(None)


def node(*, minor: int = 40, metadata: dict[str, Any] | None = None) -> Any:
    value = base_pb2.Node(id="test-node", cluster="test")
    value.user_agent_build_version.version.major_number = 1
    value.user_agent_build_version.version.minor_number = minor
    if metadata:
        struct = struct_pb2.Struct()
        struct.update(metadata)
        value.metadata.CopyFrom(struct)
    return value


def request(*names: str, version: str = "", nonce: str = "", error: str | None = None, **extra: Any) -> Any:
    message = discovery_pb2.DiscoveryRequest(
        resource_names=list(names),
        version_info=version,
        response_nonce=nonce,
        type_url=extra.pop("type_url", SECRET_TYPE_URL),
        node=extra.pop("node", node()),
        **extra,
    )
    if error is not None:
        message.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
    return message


def secrets_of(response: Any) -> dict[str, Any]:
    found = {}
    for packed in response.resources:
        secret = secret_pb2.Secret()
        assert packed.Unpack(secret)
        found[secret.name] = secret
    return found


class Stream:
    """A bidirectional SDS call, read in the background."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self.queue.put_nowait(message)
        except grpc.aio.AioRpcError as err:
            self.queue.put_nowait(err)

    async def send(self, message: Any) -> None:
        """Write a request; a call the server already ended shows its status in :meth:`status`."""
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self.call.write(message)

    async def next(self, timeout: float = 10) -> Any:
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, grpc.aio.AioRpcError):
            raise item
        return item

    async def status(self) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.next()
        return caught.value.code(), caught.value.details() or ""

    async def nothing(self) -> None:
        await asyncio.sleep(QUIET)
        assert self.queue.empty(), f"unexpected message: {self.queue.get_nowait()}"

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def streams(served: Served) -> AsyncIterator[list[Stream]]:
    opened: list[Stream] = []
    yield opened
    for stream in opened:
        await stream.close()


async def open_stream(served: Served, streams: list[Stream], kind: str = "StreamSecrets") -> Stream:
    stream = Stream(getattr(served.stub, kind)())
    streams.append(stream)
    return stream


async def subscribe(served: Served, streams: list[Stream], *names: str, **options: Any) -> tuple[Stream, Any]:
    stream = await open_stream(served, streams)
    await stream.send(request(*names, **options))
    return stream, await stream.next()


# --- StreamSecrets --------------------------------------------------------------------------------------


async def test_first_request_gets_the_secret(served: Served, streams: list[Stream]) -> None:
    _, response = await subscribe(served, streams, "default")
    assert response.type_url == SECRET_TYPE_URL
    assert response.nonce
    secret = secrets_of(response)["default"]
    svid = served.identities.entries[0].svid
    assert secret.tls_certificate.certificate_chain.inline_bytes == svid.cert_chain_pem()
    assert secret.tls_certificate.private_key.inline_bytes == svid.private_key_pem()
    assert served.attestor.attested == [served.caller.caller]


async def test_ack_is_quiet_and_rotation_is_pushed(served: Served, streams: list[Stream]) -> None:
    stream, first = await subscribe(served, streams, "default")
    await stream.send(request("default", version=first.version_info, nonce=first.nonce))
    await stream.nothing()
    served.identities.bump()  # a change elsewhere in the cache: nothing to send
    await stream.nothing()
    rotated = served.identities.rotate(0)
    pushed = await stream.next()
    assert pushed.version_info != first.version_info
    assert pushed.nonce != first.nonce
    chain = secrets_of(pushed)["default"].tls_certificate.certificate_chain.inline_bytes
    assert chain == rotated.cert_chain_pem()
    assert served.attestor.attested == [served.caller.caller]  # attested once per stream


async def test_rotation_reaches_only_streams_that_subscribe(served: Served, streams: list[Stream]) -> None:
    svid_stream, _ = await subscribe(served, streams, "default")
    ext_stream, _ = await subscribe(served, streams, WEB_EXT)
    bundle_stream, _ = await subscribe(served, streams, "ROOTCA")
    served.identities.rotate(0)
    assert WEB_EXT not in secrets_of(await svid_stream.next())
    await ext_stream.nothing()
    await bundle_stream.nothing()


async def test_version_is_the_content_version(served: Served, streams: list[Stream]) -> None:
    _, one = await subscribe(served, streams, "default", "ROOTCA")
    _, two = await subscribe(served, streams, "default", "ROOTCA")
    assert one.version_info == two.version_info
    assert one.nonce != two.nonce
    assert list(secrets_of(one)) == ["default", "ROOTCA"]


async def test_nack_is_logged_and_not_answered(
    served: Served, streams: list[Stream], caplog: pytest.LogCaptureFixture
) -> None:
    stream, first = await subscribe(served, streams, "default")
    await stream.send(request("default", version=first.version_info, nonce=first.nonce))
    served.identities.rotate(0)
    second = await stream.next()
    reason = "Failed to load private key from <inline>, Cause: KEY_VALUES_MISMATCH"
    with caplog.at_level(logging.WARNING, logger="sidecar.sds.service"):
        await stream.send(request("default", version=first.version_info, nonce=second.nonce, error=reason))
        await stream.nothing()
    [record] = [r for r in caplog.records if r.getMessage() == "sds: envoy rejected secrets"]
    assert record.__dict__["reason"] == reason
    assert record.__dict__["node_id"] == "test-node"
    assert record.__dict__["rejected_version"] == second.version_info
    assert record.__dict__["kept_version"] == first.version_info
    served.identities.rotate(0)
    assert (await stream.next()).version_info not in (first.version_info, second.version_info)


async def test_reconnect_with_old_version_gets_full_state(served: Served, streams: list[Stream]) -> None:
    stream, first = await subscribe(served, streams, "default")
    await stream.close()
    _, again = await subscribe(served, streams, "default", version=first.version_info)
    assert again.version_info == first.version_info
    assert "default" in secrets_of(again)


async def test_empty_subscription_is_everything(served: Served, streams: list[Stream]) -> None:
    _, response = await subscribe(served, streams)
    assert list(secrets_of(response)) == [WEB, WEB_EXT, "spiffe://example.org", "spiffe://partner.org"]


@pytest.mark.parametrize(
    ("options", "validator"),
    [
        ({}, True),
        ({"node": node(minor=17)}, False),
        ({"node": node(metadata={"disable_spiffe_cert_validation": True})}, False),
    ],
)
async def test_validation_context_kind(
    served: Served, streams: list[Stream], options: dict[str, Any], validator: bool
) -> None:
    _, response = await subscribe(served, streams, "ROOTCA", **options)
    context = secrets_of(response)["ROOTCA"].validation_context
    if validator:
        assert context.custom_validator_config.name == SPIFFE_VALIDATOR
    else:
        assert context.trusted_ca.inline_bytes == served.identities.x509_bundle.pem()


@pytest.mark.parametrize(
    ("names", "code", "message"),
    [
        (
            ("default", "spiffe://example.org/db"),
            grpc.StatusCode.PERMISSION_DENIED,
            'sds: workload is not authorized for the requested resources: "spiffe://example.org/db"',
        ),
        (
            ("spiffe://other.org",),
            grpc.StatusCode.PERMISSION_DENIED,
            'sds: workload is not authorized for the requested resources: "spiffe://other.org"',
        ),
        (
            ("bogus",),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sds: resource name must be one of ['default', 'ROOTCA', 'ALL'], a SPIFFE ID or a trust domain ID: "
            '"bogus"',
        ),
    ],
)
async def test_unauthorized_names_end_the_stream(
    served: Served, streams: list[Stream], names: tuple[str, ...], code: grpc.StatusCode, message: str
) -> None:
    stream = await open_stream(served, streams)
    await stream.send(request(*names))
    assert await stream.status() == (code, message)


async def test_wrong_type_url(served: Served, streams: list[Stream]) -> None:
    stream = await open_stream(served, streams)
    await stream.send(request("default", type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"))
    assert await stream.status() == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "sds: type_url must be type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret, "
        'not "type.googleapis.com/envoy.config.cluster.v3.Cluster"',
    )


async def test_unknown_caller(served: Served, streams: list[Stream]) -> None:
    served.caller.caller = None
    stream = await open_stream(served, streams)
    await stream.send(request("default"))
    assert await stream.status() == (grpc.StatusCode.UNAVAILABLE, "sds: could not identify the calling process")
    assert served.attestor.attested == []


async def test_attestation_failure(served: Served, streams: list[Stream]) -> None:
    served.attestor.error = WorkloadAttestationError("process exited")
    stream = await open_stream(served, streams)
    await stream.send(request("default"))
    assert await stream.status() == (
        grpc.StatusCode.UNAVAILABLE,
        "sds: could not attest the calling process (workload: process exited)",
    )


async def test_caller_without_entries(served: Served, streams: list[Stream]) -> None:
    served.attestor.selectors = frozenset({"unix:uid:9999"})
    stream = await open_stream(served, streams)
    await stream.send(request("ROOTCA"))
    assert await stream.status() == (grpc.StatusCode.PERMISSION_DENIED, "sds: no identity issued")


async def test_losing_the_identity_ends_the_stream(served: Served, streams: list[Stream]) -> None:
    stream, _ = await subscribe(served, streams, "default")
    served.identities.remove_entries()
    assert await stream.status() == (grpc.StatusCode.PERMISSION_DENIED, "sds: no identity issued")


async def test_pending_svid_is_sent_once_signed(tmp_path: Path, served: Served, streams: list[Stream]) -> None:
    served.identities.entries.clear()
    entry = served.identities.add_entry("/new", pending=True)
    stream = await open_stream(served, streams)
    await stream.send(request("default"))
    await stream.nothing()
    served.identities.issue(entry)
    response = await stream.next()
    assert secrets_of(response)["default"].tls_certificate.certificate_chain.inline_bytes == entry.svid.cert_chain_pem()


async def test_stream_ends_quietly_when_the_client_half_closes(served: Served, streams: list[Stream]) -> None:
    stream, _ = await subscribe(served, streams, "default")
    await stream.call.done_writing()
    await asyncio.wait_for(stream.task, 10)
    assert stream.queue.empty()
    assert await stream.call.code() == grpc.StatusCode.OK


# --- FetchSecrets -----------------------------------------------------------------------------------------


async def test_fetch_secrets(served: Served) -> None:
    response = await served.stub.FetchSecrets(request("default", "ROOTCA"))
    assert list(secrets_of(response)) == ["default", "ROOTCA"]
    assert response.version_info
    assert response.type_url == SECRET_TYPE_URL


async def test_fetch_secrets_refusal(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.FetchSecrets(request("spiffe://example.org/db"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_fetch_secrets_pending(served: Served) -> None:
    served.identities.entries.clear()
    served.identities.add_entry("/new", pending=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.FetchSecrets(request("default"))
    assert (caught.value.code(), caught.value.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "sds: the workload's SVIDs are still being signed",
    )


# --- DeltaSecrets -----------------------------------------------------------------------------------------


def delta(
    subscribe: tuple[str, ...] = (),
    unsubscribe: tuple[str, ...] = (),
    nonce: str = "",
    initial: dict[str, str] | None = None,
    error: str | None = None,
) -> Any:
    message = discovery_pb2.DeltaDiscoveryRequest(
        node=node(),
        type_url=SECRET_TYPE_URL,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        response_nonce=nonce,
        initial_resource_versions=initial or {},
    )
    if error is not None:
        message.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
    return message


def delta_resources(response: Any) -> dict[str, str]:
    found = {}
    for resource in response.resources:
        secret = secret_pb2.Secret()
        assert resource.resource.Unpack(secret)
        assert secret.name == resource.name
        found[resource.name] = resource.version
    return found


async def test_delta_wildcard_rotation_and_removal(served: Served, streams: list[Stream]) -> None:
    stream = await open_stream(served, streams, "DeltaSecrets")
    await stream.send(delta())
    first = await stream.next()
    everything = delta_resources(first)
    assert list(everything) == [WEB, WEB_EXT, "spiffe://example.org", "spiffe://partner.org"]
    assert first.system_version_info == content_version(everything)
    await stream.send(delta(nonce=first.nonce))
    await stream.nothing()
    served.identities.rotate(1)
    rotated = await stream.next()
    assert list(delta_resources(rotated)) == [WEB_EXT]
    assert delta_resources(rotated)[WEB_EXT] != everything[WEB_EXT]
    served.identities.entries[1].federates_with = ()
    served.identities.bump()
    removed = await stream.next()
    assert list(removed.removed_resources) == ["spiffe://partner.org"]
    assert list(removed.resources) == []


async def test_delta_subscribe_unsubscribe(served: Served, streams: list[Stream]) -> None:
    stream = await open_stream(served, streams, "DeltaSecrets")
    await stream.send(delta(subscribe=("default",)))
    first = await stream.next()
    assert list(delta_resources(first)) == ["default"]
    await stream.send(delta(subscribe=("ROOTCA",), nonce=first.nonce))
    second = await stream.next()
    assert list(delta_resources(second)) == ["ROOTCA"]
    await stream.send(delta(unsubscribe=("default",), nonce=second.nonce))
    await stream.nothing()
    served.identities.rotate(0)  # no longer subscribed to default
    await stream.nothing()


async def test_delta_initial_versions(served: Served, streams: list[Stream]) -> None:
    stream = await open_stream(served, streams, "DeltaSecrets")
    await stream.send(delta(subscribe=("default", "ROOTCA")))
    first = await stream.next()
    versions = delta_resources(first)
    await stream.close()
    again = await open_stream(served, streams, "DeltaSecrets")
    await again.send(delta(subscribe=("default", "ROOTCA"), initial={"default": versions["default"], "ROOTCA": "old"}))
    assert list(delta_resources(await again.next())) == ["ROOTCA"]


async def test_delta_nack_is_logged(served: Served, streams: list[Stream], caplog: pytest.LogCaptureFixture) -> None:
    stream = await open_stream(served, streams, "DeltaSecrets")
    await stream.send(delta(subscribe=("default",)))
    first = await stream.next()
    with caplog.at_level(logging.WARNING, logger="sidecar.sds.service"):
        await stream.send(delta(nonce=first.nonce, error="bad certificate"))
        await stream.nothing()
    assert [r.__dict__["reason"] for r in caplog.records if r.getMessage() == "sds: envoy rejected secrets"] == [
        "bad certificate"
    ]


async def test_delta_protocol_violation(served: Served, streams: list[Stream]) -> None:
    stream = await open_stream(served, streams, "DeltaSecrets")
    await stream.send(delta(subscribe=("default",), nonce="made-up"))
    assert await stream.status() == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "sds: the first request of a stream must not carry a response nonce",
    )


async def test_delta_unauthorized(served: Served, streams: list[Stream]) -> None:
    stream = await open_stream(served, streams, "DeltaSecrets")
    await stream.send(delta(subscribe=("spiffe://example.org/db",)))
    assert (await stream.status())[0] == grpc.StatusCode.PERMISSION_DENIED
