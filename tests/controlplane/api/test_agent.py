"""The agent API's signing batch: results in request order, per-item errors, CSR checks in a pool.

A real CA (``CASigner`` over a ``CAManager`` in ``tmp_path``) signs; the signer is wrapped to
count rotation checks and to finish CSR checks out of order, so a result that followed the order
the checks completed in, instead of the request's, would show.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from controlplane.api.agent import AgentService, X509Issuer
from controlplane.api.hub import EntryHub
from controlplane.app import CASigner, Metrics
from controlplane.ca.errors import CAError
from controlplane.ca.manager import CAManager
from controlplane.ca.svid import public_key_from_csr
from controlplane.ca.x509ca import BACKDATE
from controlplane.config import ServerConfig
from controlplane.model import RegistrationEntry, Selector
from controlplane.store import Store, sqlite_url
from sidecar.agent.serverapi import make_csr
from spiffecore import SpiffeID, id_from_cert
from spiffeproto import agent_pb2
from tests.support.ca import new_key

TD = "example.org"
AGENT = SpiffeID.parse(f"spiffe://{TD}/spire/agent/join_token/t")


class CountingSigner:
    """A real CA signer that counts rotation checks and delays each CSR check at random."""

    def __init__(self, inner: CASigner) -> None:
        self.inner = inner
        self.issuers = 0
        self.checked: list[bytes] = []
        self._lock = threading.Lock()
        self._random = random.Random(7)  # noqa: S311 - delays, not secrets

    def public_key_from_csr(self, csr_der: bytes) -> object:
        with self._lock:
            delay = self._random.uniform(0, 0.004)
            self.checked.append(csr_der)
        time.sleep(delay)
        return self.inner.public_key_from_csr(csr_der)

    def x509_svid(
        self, spiffe_id: SpiffeID, public_key: object, *, dns_names: tuple[str, ...], ttl: timedelta | None
    ) -> tuple[x509.Certificate, ...]:
        return self.inner.x509_svid(spiffe_id, public_key, dns_names=dns_names, ttl=ttl)

    def x509_issuer(self) -> X509Issuer:
        self.issuers += 1
        return self.inner.x509_issuer()

    def jwt_svid(
        self, spiffe_id: SpiffeID, audience: tuple[str, ...], *, ttl: timedelta | None
    ) -> tuple[str, datetime]:
        return self.inner.jwt_svid(spiffe_id, audience, ttl=ttl)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(sqlite_url(tmp_path)) as opened:
        yield opened


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def _signed(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("spiffe_server_x509_svids_signed_total") or 0.0


@pytest.fixture
def signer(tmp_path: Path, metrics: Metrics) -> CountingSigner:
    config = ServerConfig(trust_domain=TD, data_dir=tmp_path)
    manager = CAManager.load_or_create(tmp_path, config.ca_config(), now=datetime.now(UTC))
    inner = CASigner(
        manager,
        x509_ttl=timedelta(hours=1),
        jwt_ttl=timedelta(minutes=5),
        clock=lambda: datetime.now(UTC),
        on_events=lambda _events: None,
        metrics=metrics,
    )
    return CountingSigner(inner)


def _service(store: Store, signer: CountingSigner, csr_checks: Executor | None) -> AgentService:
    config = ServerConfig(trust_domain=TD)
    return AgentService(
        store=store,
        hub=EntryHub(store, config.trust_domain_value),
        signer=signer,
        attestors={},
        trust_domain=config.trust_domain_value,
        clock=lambda: datetime.now(UTC),
        agent_svid_ttl=timedelta(hours=1),
        csr_checks=csr_checks,
    )


def _entries(count: int) -> dict[str, RegistrationEntry]:
    entries = [
        RegistrationEntry(
            spiffe_id=SpiffeID.parse(f"spiffe://{TD}/workload/{index}"),
            parent_id=AGENT,
            selectors=(Selector(type="unix", value=f"uid:{index}"),),
            id=f"entry-{index}",
            x509_svid_ttl=600 if index % 2 else 0,
        )
        for index in range(count)
    ]
    return {entry.id: entry for entry in entries}


@pytest.fixture(params=["pool", "inline"])
def csr_checks(request: pytest.FixtureRequest) -> Iterator[Executor | None]:
    if request.param == "inline":
        yield None
        return
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


def test_batch_results_follow_the_request_order_with_per_item_errors(
    store: Store, signer: CountingSigner, csr_checks: Executor | None, registry: CollectorRegistry
) -> None:
    service = _service(store, signer, csr_checks)
    authorized = _entries(30)
    garbage = b"not a CSR"
    with pytest.raises(CAError) as refused:
        public_key_from_csr(garbage)
    params = []
    expected: list[str | tuple[int, str]] = []
    for index in range(40):
        if index % 7 == 3:
            params.append(agent_pb2.NewX509SVIDParams(entry_id=f"stranger-{index}", csr=make_csr(new_key())))
            expected.append(
                (
                    grpc.StatusCode.PERMISSION_DENIED.value[0],
                    f'agent-api: entry is not authorized for this agent: "stranger-{index}"',
                )
            )
        elif index % 7 == 5:
            params.append(agent_pb2.NewX509SVIDParams(entry_id=f"entry-{index % 30}", csr=garbage))
            expected.append((grpc.StatusCode.INVALID_ARGUMENT.value[0], str(refused.value)))
        else:
            params.append(agent_pb2.NewX509SVIDParams(entry_id=f"entry-{index % 30}", csr=make_csr(new_key())))
            expected.append(str(authorized[f"entry-{index % 30}"].spiffe_id))
    before = _signed(registry)

    results = service._sign_batch(authorized, params)

    assert len(results) == len(params)
    for item, result, want in zip(params, results, expected, strict=True):
        if isinstance(want, tuple):
            assert (result.error_code, result.error_message) == want
            assert not result.HasField("svid")
            continue
        assert result.error_code == 0
        assert result.svid.spiffe_id == want
        leaf = x509.load_der_x509_certificate(result.svid.cert_chain[0])
        assert str(id_from_cert(leaf)) == want
        assert leaf.public_key() == x509.load_der_x509_csr(item.csr).public_key()
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc - BACKDATE
        assert lifetime == timedelta(seconds=authorized[item.entry_id].x509_svid_ttl or 3600)
    assert signer.issuers == 1  # one rotation check for the whole batch
    assert sorted(signer.checked) == sorted(item.csr for item in params if item.entry_id.startswith("entry-"))
    assert _signed(registry) - before == sum(1 for want in expected if isinstance(want, str))


def test_an_empty_batch_signs_nothing(store: Store, signer: CountingSigner, csr_checks: Executor | None) -> None:
    assert _service(store, signer, csr_checks)._sign_batch(_entries(1), []) == []
    assert signer.checked == []


def test_a_batch_of_strangers_checks_no_csr(store: Store, signer: CountingSigner, csr_checks: Executor | None) -> None:
    params = [agent_pb2.NewX509SVIDParams(entry_id="nobody", csr=make_csr(new_key())) for _ in range(3)]
    results = _service(store, signer, csr_checks)._sign_batch(_entries(2), params)
    assert [result.error_code for result in results] == [grpc.StatusCode.PERMISSION_DENIED.value[0]] * 3
    assert signer.checked == []


def test_an_unexpected_error_ends_the_batch_and_cancels_queued_checks(store: Store, signer: CountingSigner) -> None:
    class BrokenCAError(RuntimeError):
        pass

    def broken_issuer() -> X509Issuer:
        raise BrokenCAError("the CA is gone")

    signer.x509_issuer = broken_issuer  # type: ignore[method-assign]
    with ThreadPoolExecutor(max_workers=1) as pool:
        service = _service(store, signer, pool)
        params = [agent_pb2.NewX509SVIDParams(entry_id="entry-0", csr=make_csr(new_key())) for _ in range(50)]
        with pytest.raises(BrokenCAError):
            service._sign_batch(_entries(1), params)
    assert len(signer.checked) < 50  # the queued checks were cancelled, not run


def test_metrics_report_attestations_and_watch_streams(metrics: Metrics, registry: CollectorRegistry) -> None:
    def attestations(attestation_type: str, result: str) -> float | None:
        labels = {"attestation_type": attestation_type, "result": result}
        return registry.get_sample_value("spiffe_server_agent_attestations_total", labels)

    assert attestations("join_token", "success") is None
    metrics.expect_attestation_types(["join_token"])
    assert attestations("join_token", "success") == 0
    assert attestations("unknown", "refused") == 0
    metrics.attestation("join_token", "success")
    metrics.attestation("join_token", "refused")
    metrics.attestation("join_token", "refused")
    metrics.watch_opened()
    metrics.watch_opened()
    metrics.watch_closed()
    assert attestations("join_token", "success") == 1
    assert attestations("join_token", "refused") == 2
    assert attestations("unknown", "refused") == 0
    assert registry.get_sample_value("spiffe_server_watch_streams") == 1
