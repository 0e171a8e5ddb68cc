"""The agent's own identity against real spiffe-server processes: attest, persist, resume, renew.

Trust on first use is also tested against small local TLS servers presenting chosen chains.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.agent.node import (
    AGENT_KEY_FILE,
    AGENT_SVID_FILE,
    BUNDLE_FILE,
    AgentNode,
    NodeError,
    NodeSettings,
    fetch_server_root,
    load_or_attest,
)
from sidecar.agent.serverapi import AgentAPIClient, AgentIdentity
from spiffecore import X509SVID, SpiffeBundle, TrustDomain
from spiffecore.der import dump_pem_certificates
from tests.support.ca import TestCA
from tests.support.server import ServerProcess, running_server

TD = TrustDomain.parse("example.org")
TD_ID = "spiffe://example.org"


def settings(server: ServerProcess, data_dir: Path, **options: object) -> NodeSettings:
    return NodeSettings(server_address=server.address, trust_domain=TD, data_dir=data_dir, **options)  # type: ignore[arg-type]


def bundle_file(tmp_path: Path, server: ServerProcess) -> Path:
    path = tmp_path / "bootstrap.pem"
    path.write_bytes(server.roots_pem())
    return path


def x509pop_files(tmp_path: Path, node_ca: TestCA, name: str) -> dict[str, Path]:
    node = node_ca.mint(uris=[], subject=name)
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem"
    cert.write_bytes(dump_pem_certificates(node.chain))
    key.write_bytes(
        node.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return {"x509pop_cert": cert, "x509pop_key": key}


@pytest.fixture(scope="module")
def fast_server(tmp_path_factory: pytest.TempPathFactory, node_ca: TestCA) -> Iterator[ServerProcess]:
    """A server whose agent SVIDs live 20 s (30 s with the CA's 10 s backdating): renewed within 2 to 8 s."""
    directory = tmp_path_factory.mktemp("fast-server")
    ca_bundle = directory / "nodes.pem"
    ca_bundle.write_bytes(node_ca.x509_bundle().pem())
    config = directory / "server.yaml"
    config.write_text(
        "trust_domain: example.org\n"
        "ca:\n  ttl: 10m\n"
        "svid:\n  x509_ttl: 30s\n  jwt_ttl: 60s\n  agent_ttl: 20s\n"
        f"attestors:\n  x509pop:\n    ca_bundle: {ca_bundle}\n"
    )
    with running_server(directory / "data", config=config) as process:
        yield process


# --- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trust_bundle": Path("b.pem"), "insecure_bootstrap": True}, "trust_bundle and insecure_bootstrap exclude"),
        ({"x509pop_cert": Path("c.pem")}, "x509pop needs both x509pop_cert and x509pop_key"),
        (
            {"join_token": "t", "x509pop_cert": Path("c.pem"), "x509pop_key": Path("k.pem")},
            "join_token and x509pop exclude each other",
        ),
        ({"join_token": ""}, "join_token must not be empty"),
    ],
)
def test_settings_refuse_contradictions(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NodeSettings(server_address="127.0.0.1:1", trust_domain=TD, data_dir=Path("d"), **options)  # type: ignore[arg-type]


def test_the_join_token_is_not_in_the_settings_repr() -> None:
    assert "secret-token" not in repr(
        NodeSettings(server_address="127.0.0.1:1", trust_domain=TD, data_dir=Path("d"), join_token="secret-token")
    )


# --- attestation and persistence ------------------------------------------------------------------


async def test_join_token_attestation_persists_a_private_identity(server: ServerProcess, tmp_path: Path) -> None:
    token = await server.atoken()
    data_dir = tmp_path / "agent"
    config = settings(server, data_dir, trust_bundle=bundle_file(tmp_path, server), join_token=token)
    identity = await load_or_attest(config)
    assert str(identity.svid.id) == f"{TD_ID}/spire/agent/join_token/{token}"
    assert (data_dir.stat().st_mode & 0o777) == 0o700
    assert (data_dir / AGENT_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert (data_dir / AGENT_SVID_FILE).stat().st_mode & 0o777 == 0o600
    persisted = X509SVID.load_pem((data_dir / AGENT_SVID_FILE).read_bytes(), (data_dir / AGENT_KEY_FILE).read_bytes())
    assert persisted == identity.svid
    assert SpiffeBundle.parse(TD, (data_dir / BUNDLE_FILE).read_bytes()) == identity.bundle


async def test_a_restart_resumes_without_a_token(server: ServerProcess, tmp_path: Path) -> None:
    token = await server.atoken()
    data_dir = tmp_path / "agent"
    first = await load_or_attest(
        settings(server, data_dir, trust_bundle=bundle_file(tmp_path, server), join_token=token)
    )
    again = await load_or_attest(settings(server, data_dir))  # no token, no bootstrap bundle: the data dir suffices
    assert again.svid.id == first.svid.id
    assert again.svid.leaf.serial_number == first.svid.leaf.serial_number
    async with AgentAPIClient(again, server.address) as client:
        assert (await client.get_bundle()).x509 == first.bundle.x509  # the server still accepts it


async def test_a_used_token_tells_the_operator_to_generate_a_new_one(server: ServerProcess, tmp_path: Path) -> None:
    token = await server.atoken()
    bootstrap = bundle_file(tmp_path, server)
    await load_or_attest(settings(server, tmp_path / "first", trust_bundle=bootstrap, join_token=token))
    with pytest.raises(NodeError) as caught:
        await load_or_attest(settings(server, tmp_path / "second", trust_bundle=bootstrap, join_token=token))
    message = str(caught.value)
    assert message.startswith("node: the join token was refused: it is unknown, expired or already used")
    assert "generate a new one with 'spiffe-server token generate'" in message
    assert token not in message


async def test_without_state_nor_attestor_the_agent_says_what_to_configure(
    server: ServerProcess, tmp_path: Path
) -> None:
    with pytest.raises(NodeError) as caught:
        await load_or_attest(settings(server, tmp_path / "a", trust_bundle=bundle_file(tmp_path, server)))
    assert "no way to attest: configure join_token, x509pop or k8s_psat" in str(caught.value)
    with pytest.raises(NodeError) as caught:
        await load_or_attest(settings(server, tmp_path / "b", join_token="t"))
    assert "no way to trust the server: set trust_bundle (or insecure_bootstrap)" in str(caught.value)


async def test_x509pop_attests_again_when_the_persisted_svid_expired(
    server: ServerProcess, tmp_path: Path, node_ca: TestCA
) -> None:
    data_dir = tmp_path / "agent"
    config = settings(
        server, data_dir, trust_bundle=bundle_file(tmp_path, server), **x509pop_files(tmp_path, node_ca, "n1")
    )
    first = await load_or_attest(config)
    assert first.can_reattest
    later = first.svid.expires_at + timedelta(seconds=1)
    again = await load_or_attest(config, clock=lambda: later)
    assert again.svid.id == first.svid.id
    assert again.svid.leaf.serial_number != first.svid.leaf.serial_number
    assert X509SVID.load_pem((data_dir / AGENT_SVID_FILE).read_bytes(), (data_dir / AGENT_KEY_FILE).read_bytes()) == (
        again.svid
    )


async def test_an_expired_svid_with_a_used_token_cannot_come_back(server: ServerProcess, tmp_path: Path) -> None:
    token = await server.atoken()
    data_dir = tmp_path / "agent"
    config = settings(server, data_dir, trust_bundle=bundle_file(tmp_path, server), join_token=token)
    first = await load_or_attest(config)
    later = first.svid.expires_at + timedelta(seconds=1)
    with pytest.raises(NodeError, match="the join token was refused"):
        await load_or_attest(config, clock=lambda: later)


async def test_a_damaged_key_file_means_attesting_again(
    server: ServerProcess, tmp_path: Path, node_ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "agent"
    config = settings(
        server, data_dir, trust_bundle=bundle_file(tmp_path, server), **x509pop_files(tmp_path, node_ca, "n2")
    )
    first = await load_or_attest(config)
    (data_dir / AGENT_KEY_FILE).write_bytes(b"garbage")
    again = await load_or_attest(config)
    assert again.svid.leaf.serial_number != first.svid.leaf.serial_number
    assert "the persisted agent SVID cannot be used; attesting again" in caplog.text


# --- trust on first use ---------------------------------------------------------------------------


async def test_insecure_bootstrap_trusts_the_root_the_server_presents(
    server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Needs the server to end its presented chain with its root (a control-plane change)."""
    token = await server.atoken()
    caplog.set_level(logging.WARNING, "sidecar.agent.node")
    identity = await load_or_attest(settings(server, tmp_path / "agent", insecure_bootstrap=True, join_token=token))
    assert str(identity.svid.id) == f"{TD_ID}/spire/agent/join_token/{token}"
    roots = x509.load_pem_x509_certificates(server.roots_pem())
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith("INSECURE BOOTSTRAP: trusting the server's root certificate on first use")
    fingerprint: str = warning.sha256  # type: ignore[attr-defined]
    assert fingerprint.replace(":", "").lower() in {
        hashlib.sha256(r.public_bytes(serialization.Encoding.DER)).hexdigest() for r in roots
    }
    assert SpiffeBundle.parse(TD, (tmp_path / "agent" / BUNDLE_FILE).read_bytes()) == identity.bundle


class ChainServer:
    """A TLS server on 127.0.0.1 that presents a chosen chain to each connection, then closes it."""

    def __init__(self, tmp_path: Path, chain: tuple[x509.Certificate, ...], key_pem: bytes) -> None:
        cert_file, key_file = tmp_path / "chain.pem", tmp_path / "chain-key.pem"
        cert_file.write_bytes(dump_pem_certificates(chain))
        key_file.write_bytes(key_pem)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file, key_file)
        self.context.verify_mode = ssl.CERT_OPTIONAL
        self.context.load_verify_locations(cadata=TestCA.create().x509_bundle().pem().decode())
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            raw, _ = self.sock.accept()
        except OSError:
            return
        with raw:
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def key_pem(minted_key: object) -> bytes:
    return minted_key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_trust_on_first_use_takes_the_self_signed_root_at_the_end(tmp_path: Path) -> None:
    ca = TestCA.create("example.org")
    leaf = ca.mint("/spire/server")
    server = ChainServer(tmp_path, (*leaf.chain, ca.cert), key_pem(leaf.key))
    try:
        assert fetch_server_root(server.address, TD, timeout=5) == ca.cert
    finally:
        server.close()


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("leaf-only", "its issuer is not its subject"),
        ("intermediate-last", "its issuer is not its subject"),
        ("other-trust-domain", "its URI SANs are ['spiffe://other.org']"),
    ],
)
def test_trust_on_first_use_refuses_anything_but_the_trust_domains_root(
    tmp_path: Path, case: str, problem: str
) -> None:
    ca = TestCA.create("other.org" if case == "other-trust-domain" else "example.org")
    if case == "intermediate-last":
        intermediate = ca.intermediate()
        leaf = intermediate.mint("/spire/server")
        chain = leaf.chain
    else:
        leaf = ca.mint("/spire/server")
        chain = leaf.chain if case == "leaf-only" else (*leaf.chain, ca.cert)
    server = ChainServer(tmp_path, chain, key_pem(leaf.key))
    try:
        with pytest.raises(NodeError) as caught:
            fetch_server_root(server.address, TD, timeout=5)
    finally:
        server.close()
    message = str(caught.value)
    assert message.startswith(
        "node: insecure bootstrap: the last certificate the server presents must be a self-signed CA certificate"
        " with URI SAN spiffe://example.org, and it is not ("
    )
    assert problem in message


def test_trust_on_first_use_reports_an_unreachable_server() -> None:
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]
    with pytest.raises(NodeError, match="insecure bootstrap: cannot reach the server"):
        fetch_server_root(f"127.0.0.1:{port}", TD, timeout=5)


# --- renewal ------------------------------------------------------------------------------------------


async def test_the_agent_svid_is_renewed_at_its_rotation_time_and_persisted(
    fast_server: ServerProcess, tmp_path: Path
) -> None:
    token = await fast_server.atoken()
    data_dir = tmp_path / "agent"
    config = settings(fast_server, data_dir, trust_bundle=bundle_file(tmp_path, fast_server), join_token=token)
    node = AgentNode(config, await load_or_attest(config))
    first = node.identity.svid
    async with AgentAPIClient(node.identity, fast_server.address) as client:
        task = asyncio.create_task(node.maintain(client))
        try:
            async with asyncio.timeout(15):
                while node.identity.svid.leaf.serial_number == first.leaf.serial_number:
                    await asyncio.sleep(0.05)
            renewed = node.identity.svid
            assert renewed.id == first.id
            assert renewed.private_key.public_key() != first.private_key.public_key()  # a new key each time
            assert datetime.now(UTC) >= first.issued_at + (first.expires_at - first.issued_at) * 0.4
            persisted = X509SVID.load_pem(
                (data_dir / AGENT_SVID_FILE).read_bytes(), (data_dir / AGENT_KEY_FILE).read_bytes()
            )
            assert persisted == renewed
            await client.get_bundle()  # the client moved to the renewed SVID
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    resumed = await load_or_attest(settings(fast_server, data_dir))
    assert resumed.svid == renewed


async def test_a_superseded_svid_is_replaced_by_attesting_again_with_x509pop(
    server: ServerProcess, tmp_path: Path, node_ca: TestCA
) -> None:
    config = settings(
        server, tmp_path / "agent", trust_bundle=bundle_file(tmp_path, server), **x509pop_files(tmp_path, node_ca, "n3")
    )
    identity = await load_or_attest(config)
    async with AgentAPIClient(identity, server.address) as other:
        await other.renew()  # someone renewed it elsewhere: ours is superseded
    svid = identity.svid
    due = svid.issued_at + (svid.expires_at - svid.issued_at) * 0.7
    node = AgentNode(config, identity, clock=lambda: due)
    async with AgentAPIClient(identity, server.address) as client:
        new_identity = await asyncio.wait_for(node.maintain(client), 20)
    assert new_identity.svid.id == svid.id
    assert node.identity is new_identity
    async with AgentAPIClient(new_identity, server.address) as client:
        await client.get_bundle()


async def test_an_expired_join_token_agent_is_stranded_and_says_so(
    server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = await server.atoken()
    config = settings(server, tmp_path / "agent", trust_bundle=bundle_file(tmp_path, server), join_token=token)
    identity: AgentIdentity = await load_or_attest(config)
    later = identity.svid.expires_at + timedelta(seconds=1)
    node = AgentNode(config, identity, clock=lambda: later)
    async with AgentAPIClient(identity, server.address) as client:
        task = asyncio.create_task(node.maintain(client))
        async with asyncio.timeout(5):
            while not node.stranded:
                await asyncio.sleep(0.01)
        assert not task.done()  # it waits; the cache keeps serving
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "cannot attest again by itself: generate a new token" in error.getMessage()
