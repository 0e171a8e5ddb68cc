"""Server mode with real TLS clients over real sockets, in front of a plaintext echo upstream."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from sidecar.proxy.address import Address
from sidecar.proxy.policy import Policy
from sidecar.proxy.relay import Timeouts
from sidecar.proxy.server import ProxyServer
from sidecar.proxy.tls import CALLBACK_FAILED, ProxyTLS
from spiffecore import AuthorizationError, SpiffeID
from tests.sidecar.proxy.support import EchoUpstream, FedSource, context_of, echo_once, tls_client
from tests.support.ca import NOW, TestCA

ALLOWED = "/client"


@dataclass
class Rig:
    ca: TestCA
    other: TestCA
    fed: FedSource
    upstream: EchoUpstream
    server: ProxyServer

    @property
    def address(self) -> Address:
        return self.server.bound

    def client(self, path: str = ALLOWED, *, ca: TestCA | None = None) -> ssl.SSLContext:
        issuer = ca or self.ca
        return tls_client(issuer.mint(path).svid(), self.ca, self.other)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    ca, other = TestCA.create("example.org"), TestCA.create("other.org")
    fed = FedSource()
    source = await fed.start(context_of(ca.mint("/server").svid(), ca.x509_bundle(), other.x509_bundle()))
    upstream = EchoUpstream()
    upstream_address = await upstream.start()
    policy = Policy.from_rules(allow_id=["spiffe://example.org/client", "spiffe://other.org/client"])
    tls = ProxyTLS(source, policy.authorizer(), server_side=True)
    server = ProxyServer(
        listen=Address.parse("127.0.0.1:0"),
        upstream=upstream_address,
        tls=tls,
        timeouts=Timeouts(handshake=1.0, connect=2.0, close=5.0),
        max_connections=50,
    )
    await server.start()
    try:
        yield Rig(ca, other, fed, upstream, server)
    finally:
        await server.drain(1.0)
        await upstream.close()
        await source.close()


async def test_stdlib_client_gets_through(rig: Rig) -> None:
    payload = os.urandom(300_000)
    got = await asyncio.to_thread(echo_once, rig.address, rig.client(), payload)
    assert got == payload
    assert rig.server.rejected == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_openssl_s_client_gets_through(rig: Rig, tmp_path: Path) -> None:
    minted = rig.ca.mint(ALLOWED)
    svid = minted.svid()
    (tmp_path / "cert.pem").write_bytes(svid.cert_chain_pem())
    (tmp_path / "key.pem").write_bytes(svid.private_key_pem())
    (tmp_path / "ca.pem").write_bytes(rig.ca.x509_bundle().pem())
    command = [
        "openssl", "s_client", "-connect", str(rig.address), "-quiet", "-verify_return_error",
        "-cert", str(tmp_path / "cert.pem"), "-key", str(tmp_path / "key.pem"), "-CAfile", str(tmp_path / "ca.pem"),
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        process.stdin.write(b"hello through s_client\n")
        await process.stdin.drain()
        line = await asyncio.wait_for(process.stdout.readline(), 10)
    finally:
        process.stdin.close()
        process.kill()
        await process.wait()
    assert line == b"hello through s_client\n"


def _refused(address: Address, context: ssl.SSLContext) -> str:
    """Connect, try a round trip; return how it failed (it must fail)."""
    try:
        got = echo_once(address, context, b"ping", timeout=5)
    except (ssl.SSLError, ConnectionError) as err:
        return type(err).__name__
    assert got == b"", "a refused client must not get data through"
    return "closed"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("disallowed-id", 'authorize: "spiffe://example.org/intruder" is not allowed: want one of IDs'),
        ("other-trust-domain-unknown", "x509: unable to get local issuer certificate"),
        ("expired", "x509: certificate has expired"),
        ("signed-by-another-trust-domain", "x509svid: could not verify leaf certificate ("),
        ("no-client-cert", "tls: handshake failed (peer did not return a certificate)"),
    ],
)
async def test_rejections_are_logged_with_the_reason(
    rig: Rig, case: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = TestCA.create("stranger.org")
    bundles_ca = rig.ca
    if case == "disallowed-id":
        context = rig.client("/intruder")
    elif case == "other-trust-domain-unknown":
        context = tls_client(stranger.mint(ALLOWED).svid(), bundles_ca)
    elif case == "signed-by-another-trust-domain":
        # other.org's CA is trusted, but not for IDs of example.org: never verify against a mixed pool.
        minted = rig.other.mint(uris=["spiffe://example.org/client"])
        context = tls_client(minted.svid(), bundles_ca)
    elif case == "expired":
        minted = rig.ca.mint(ALLOWED, not_before=NOW - timedelta(hours=3), not_after=NOW - timedelta(hours=1))
        context = tls_client(minted.svid(), bundles_ca)
    else:
        context = tls_client(None, bundles_ca)
    with caplog.at_level(logging.INFO, logger="sidecar.proxy"):
        outcome = await asyncio.to_thread(_refused, rig.address, context)
        for _ in range(100):
            if rig.server.rejected:
                break
            await asyncio.sleep(0.01)
    assert outcome in {"SSLError", "ConnectionResetError", "closed"}
    assert rig.server.rejected == 1
    assert rig.upstream.connections == 0
    reasons = [getattr(r, "reason", "") for r in caplog.records if r.getMessage() == "connection rejected"]
    assert len(reasons) == 1
    assert reasons[0].startswith(reason), reasons


def _alert(address: Address, context: ssl.SSLContext, version: ssl.TLSVersion) -> str:
    """The alert the proxy refused ``context``'s client with, from the client's ``SSLError``.

    In TLS 1.3 the client's handshake ends before the server has read its certificate: the alert
    arrives at the first read. Nothing is sent, so the alert is never lost to a reset.
    """
    context.minimum_version = context.maximum_version = version
    try:
        with (
            socket.create_connection((address.host, address.port), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            got = tls.recv(1)
    except ssl.SSLError as err:
        return str(err.reason)
    raise AssertionError(f"the proxy let the client through (read {got!r})")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
@pytest.mark.parametrize(
    ("case", "alert"),
    [
        # Ours: a verified SVID whose ID is not allowed, and a leaf that fails the SPIFFE check
        # against its own trust domain's bundle (never internal_error, which reads like a bug).
        ("disallowed-id", "SSLV3_ALERT_BAD_CERTIFICATE"),
        ("signed-by-another-trust-domain", "SSLV3_ALERT_BAD_CERTIFICATE"),
        # OpenSSL's own, unchanged.
        ("expired", "SSLV3_ALERT_CERTIFICATE_EXPIRED"),
        ("other-trust-domain-unknown", "TLSV1_ALERT_UNKNOWN_CA"),
        ("no-client-cert", "no-client-cert"),
    ],
)
async def test_a_refused_peer_gets_the_alert_that_names_the_problem(
    rig: Rig, case: str, alert: str, version: ssl.TLSVersion
) -> None:
    if case == "disallowed-id":
        context = rig.client("/intruder")
    elif case == "signed-by-another-trust-domain":
        context = tls_client(rig.other.mint(uris=["spiffe://example.org/client"]).svid(), rig.ca)
    elif case == "expired":
        minted = rig.ca.mint(ALLOWED, not_before=NOW - timedelta(hours=3), not_after=NOW - timedelta(hours=1))
        context = tls_client(minted.svid(), rig.ca)
    elif case == "other-trust-domain-unknown":
        context = tls_client(TestCA.create("stranger.org").mint(ALLOWED).svid(), rig.ca)
    else:
        context = tls_client(None, rig.ca)
        # TLS 1.3 has an alert for it; in TLS 1.2 OpenSSL sends handshake_failure.
        alert = (
            "TLSV13_ALERT_CERTIFICATE_REQUIRED"
            if version == ssl.TLSVersion.TLSv1_3
            else "SSLV3_ALERT_HANDSHAKE_FAILURE"
        )
    assert await asyncio.to_thread(_alert, rig.address, context, version) == alert
    assert rig.upstream.connections == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_openssl_s_client_with_a_disallowed_id_reads_bad_certificate(rig: Rig, tmp_path: Path) -> None:
    svid = rig.ca.mint("/intruder").svid()
    (tmp_path / "cert.pem").write_bytes(svid.cert_chain_pem())
    (tmp_path / "key.pem").write_bytes(svid.private_key_pem())
    (tmp_path / "ca.pem").write_bytes(rig.ca.x509_bundle().pem())
    command = [
        "openssl", "s_client", "-connect", str(rig.address), "-tls1_3", "-ign_eof", "-verify_return_error",
        "-cert", str(tmp_path / "cert.pem"), "-key", str(tmp_path / "key.pem"), "-CAfile", str(tmp_path / "ca.pem"),
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(b""), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert b"alert bad certificate" in err, err.decode(errors="replace")
    assert b"internal error" not in err


class _BrokenAuthorizer:
    """An authorizer with a bug: raises what no authorizer should."""

    def __call__(self, peer: SpiffeID) -> None:
        raise RuntimeError(f"bug while judging {peer}")


async def test_a_bug_in_the_verify_callback_refuses_the_peer_and_is_logged(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.server.tls.authorizer = _BrokenAuthorizer()
    with caplog.at_level(logging.INFO, logger="sidecar.proxy"):
        alert = await asyncio.to_thread(_alert, rig.address, rig.client(), ssl.TLSVersion.TLSv1_3)
        for _ in range(100):
            if rig.server.rejected:
                break
            await asyncio.sleep(0.01)
    assert alert == "TLSV1_ALERT_INTERNAL_ERROR"  # the truth, this time
    assert rig.upstream.connections == 0
    failures = [r for r in caplog.records if r.getMessage() == "the TLS verify callback failed"]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert "bug while judging spiffe://example.org/client" in str(failures[0].exc_info[1])
    reasons = [getattr(r, "reason", "") for r in caplog.records if r.getMessage() == "connection rejected"]
    assert reasons == [CALLBACK_FAILED]
    # The server is unharmed: with a working authorizer again, the next peer gets through.
    rig.server.tls.authorizer = Policy.from_rules(allow_id=[f"spiffe://example.org{ALLOWED}"]).authorizer()
    assert await asyncio.to_thread(echo_once, rig.address, rig.client(), b"after the bug") == b"after the bug"


class _AllowsOnce:
    """An authorizer that allows its first peer and refuses every later one."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, peer: SpiffeID) -> None:
        self.calls += 1
        if self.calls > 1:
            raise AuthorizationError(peer, "allowed once already")


async def test_a_remembered_chain_is_not_verified_again_but_is_authorized_every_time(rig: Rig) -> None:
    authorizer = _AllowsOnce()
    rig.server.tls.authorizer = authorizer
    context = rig.client()
    assert await asyncio.to_thread(echo_once, rig.address, context, b"first") == b"first"
    alert = await asyncio.to_thread(_alert, rig.address, context, ssl.TLSVersion.TLSv1_3)
    assert alert == "SSLV3_ALERT_BAD_CERTIFICATE"
    assert authorizer.calls == 2
    # The second handshake found the chain among those the context verified: no second SPIFFE
    # verification (the shared cache was asked once, and missed).
    assert (rig.server.tls.cache.misses, rig.server.tls.cache.hits) == (1, 0)


async def test_other_trust_domain_in_the_bundle_set_is_verified_against_its_own_bundle(rig: Rig) -> None:
    payload = b"federated peer"
    got = await asyncio.to_thread(echo_once, rig.address, rig.client(ca=rig.other), payload)
    assert got == payload


async def test_garbage_and_stalled_handshakes_do_not_harm_others(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    garbage = [socket.create_connection((rig.address.host, rig.address.port)) for _ in range(5)]
    stalled = [socket.create_connection((rig.address.host, rig.address.port)) for _ in range(5)]
    try:
        for sock in garbage:
            sock.sendall(os.urandom(4096))
        for sock in stalled:
            sock.sendall(b"\x16\x03\x01")  # the start of a record, and then nothing
        payload = os.urandom(50_000)
        results = await asyncio.gather(
            *(asyncio.to_thread(echo_once, rig.address, rig.client(), payload) for _ in range(5))
        )
        assert all(r == payload for r in results)
        # The stalled ones are dropped by the handshake timeout (1 s).
        for sock in stalled:
            sock.settimeout(5)
            assert await loop.run_in_executor(None, sock.recv, 1) == b""
    finally:
        for sock in garbage + stalled:
            sock.close()
    assert rig.server.rejected >= 10


async def test_max_connections_refuses_the_flood_keeps_the_rest(rig: Rig) -> None:
    rig.server.max_connections = 3
    holders = [socket.create_connection((rig.address.host, rig.address.port)) for _ in range(3)]
    try:
        for _ in range(100):
            if rig.server.connections == 3:
                break
            await asyncio.sleep(0.01)
        extra = socket.create_connection((rig.address.host, rig.address.port))
        extra.settimeout(5)
        try:
            data = await asyncio.to_thread(extra.recv, 1)
        except ConnectionResetError:
            data = b""
        assert data == b""
        assert rig.server.refused >= 1
    finally:
        for sock in holders:
            sock.close()
        extra.close()
    for _ in range(300):
        if rig.server.connections == 0:
            break
        await asyncio.sleep(0.01)
    got = await asyncio.to_thread(echo_once, rig.address, rig.client(), b"after the flood")
    assert got == b"after the flood"


async def test_rotation_under_continuous_connections(rig: Rig) -> None:
    """New connections present the newest certificate; no connection, old or new, is dropped."""
    stop = asyncio.Event()
    failures: list[str] = []
    done = 0

    def one_long_connection(rounds: int) -> None:
        context = rig.client()
        with (
            socket.create_connection((rig.address.host, rig.address.port), timeout=10) as raw,
            context.wrap_socket(raw) as tls,
        ):
            for i in range(rounds):
                message = f"round {i}".encode() * 100
                tls.sendall(message)
                got = b""
                while len(got) < len(message):
                    got += tls.recv(65536)
                if got != message:
                    failures.append(f"long connection round {i}")

    async def churn() -> None:
        nonlocal done
        while not stop.is_set():
            got = await asyncio.to_thread(echo_once, rig.address, rig.client(), b"x" * 1000)
            if got != b"x" * 1000:
                failures.append("short connection")
            done += 1

    long_lived = asyncio.create_task(asyncio.to_thread(one_long_connection, 400))
    churners = [asyncio.create_task(churn()) for _ in range(3)]
    serials = set()
    for _ in range(5):
        new_svid = rig.ca.mint("/server").svid()
        await rig.fed.publish(context_of(new_svid, rig.ca.x509_bundle(), rig.other.x509_bundle()))
        presented = await asyncio.to_thread(_presented_serial, rig.address, rig.client())
        assert presented == new_svid.cert_chain[0].serial_number
        serials.add(presented)
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(long_lived, *churners)
    assert failures == []
    assert len(serials) == 5
    assert rig.server.tls.rotations >= 4  # the first context is built, not rotated
    assert done > 0


def _presented_serial(address: Address, context: ssl.SSLContext) -> int:
    from cryptography import x509

    with socket.create_connection((address.host, address.port), timeout=10) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(b"z")
        assert tls.recv(1) == b"z"
        return x509.load_der_x509_certificate(der).serial_number


async def test_drain_waits_for_connections_in_flight(rig: Rig) -> None:
    context = rig.client()
    raw = socket.create_connection((rig.address.host, rig.address.port), timeout=10)
    tls = await asyncio.to_thread(context.wrap_socket, raw)
    try:
        await asyncio.to_thread(tls.sendall, b"a")
        assert await asyncio.to_thread(tls.recv, 1) == b"a"
        drain = asyncio.create_task(rig.server.drain(5.0))
        await asyncio.sleep(0.2)
        assert not drain.done()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.to_thread(socket.create_connection, (rig.address.host, rig.address.port), 2)
        await asyncio.to_thread(tls.sendall, b"b")  # the connection in flight still works
        assert await asyncio.to_thread(tls.recv, 1) == b"b"
    finally:
        tls.close()
    await asyncio.wait_for(drain, 5)
    assert rig.server.connections == 0


async def test_idle_timeout_closes_a_quiet_connection(rig: Rig) -> None:
    quiet = ProxyServer(
        listen=Address.parse("127.0.0.1:0"),
        upstream=rig.server.upstream,
        tls=rig.server.tls,
        timeouts=Timeouts(handshake=1.0, idle=0.3),
    )
    await quiet.start()
    try:

        def talk_then_wait() -> tuple[bytes, float]:
            address = quiet.bound
            with (
                socket.create_connection((address.host, address.port), timeout=10) as raw,
                rig.client().wrap_socket(raw) as tls,
            ):
                tls.sendall(b"once")
                assert tls.recv(4) == b"once"
                began = time.monotonic()
                try:
                    data = tls.recv(1)
                except (ssl.SSLError, ConnectionError):
                    data = b""
                return data, time.monotonic() - began

        data, waited = await asyncio.to_thread(talk_then_wait)
        assert data == b""
        assert 0.2 < waited < 5
    finally:
        await quiet.drain(1.0)
