"""Benchmark: the control plane's hot paths, through real spiffe-server processes and a real agent client.

Why these paths are hot: every workload SVID of every node is signed through ``BatchNewX509SVID``,
again at every rotation, so a fleet's signing rate is the server's ceiling; an agent that starts
(or reconnects) receives every entry authorized for it as a paged snapshot before it can serve a
workload; and an entry an operator creates is of no use until the agents hear of it, which is
what a deployment waits for.

What it measures, in one run:

- Signing: X.509-SVIDs per second through ``BatchNewX509SVID`` (batches of 100 P-256 CSRs for
  100 entries of one agent, over that agent's one mTLS connection; one batch at a time, then four
  batches in flight at once), with the agent client of ``sidecar.agent.serverapi``. Next to it,
  measured in this process in the same run: "raw sign" is cryptography building an equivalent
  SVID certificate (same subject, issuer, extensions and P-256 CA key, from scratch) and signing
  it, on a public key parsed beforehand; "raw check+sign" adds what the server must also do per
  item, as SPIRE does: parse the DER CSR, check its self-signature and take its public key.
  Both raw columns run on one thread; the server may use every core (the CSR checks release
  the GIL), and on a small machine it shares the cores with this client.
- Snapshot: the time from opening ``WatchEntries`` to receiving (and converting) the last
  snapshot page, for an agent with 50,000 entries (server's default page of 1,000). The entries
  are written for set-up only, straight into the server's SQLite database with the store's
  ``create_entries`` (5,000 per transaction) from this process; the server picks them up through
  its change feed like any other write, and the benchmark waits until the agent's open watch has
  received all of them as deltas before it times fresh snapshots.
- Latency: entry created to agent notified. Entries are created one at a time through the
  registration API (a gRPC client on the admin socket, so no CLI process start-up is measured)
  while the agent watches; the time runs from just before ``CreateEntry`` to the arrival of the
  delta carrying that entry. On one server (SQLite), and across two servers sharing one
  PostgreSQL database (created on A, watched on B; a new, uniquely named database dropped at the
  end).

Method: signing is measured in repetitions; each runs the four signing cases once, the order
rotating each repetition so machine noise hits them alike; the raw cases are calibrated like
``bench/verify.py`` so one batch takes about the same wall time. Reported: medians over
repetitions. The clock is ``time.perf_counter`` (wall).

Run from the repository root: ``.venv/bin/python bench/controlplane.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import cryptography
import grpc
import psycopg
from cryptography import x509
from cryptography.hazmat.backends.openssl import backend
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy.engine import URL, make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Verdict, table
from controlplane.model import RegistrationEntry, Selector
from controlplane.store import Store, sqlite_url
from sidecar.agent.serverapi import (
    JOIN_TOKEN,
    AgentAPIClient,
    AgentIdentity,
    EntryDeltas,
    SnapshotPage,
    WatchEvent,
    attest,
    bundle_from_proto,
    generate_key,
    make_csr,
)
from spiffecore import SpiffeID
from spiffecore.der import dump_pem_certificates
from spiffeproto import registration_pb2, registration_pb2_grpc, types_pb2
from tests.support.server import ServerProcess, start_server

TRUST_DOMAIN: Final = "example.org"
SIGNING_TARGET: Final = 0.60
ONE_SERVER_P99_TARGET: Final = 0.100
TWO_SERVERS_P99_TARGET: Final = 1.0
BATCH: Final = 100
CONCURRENT_BATCHES: Final = 4
BULK_CHUNK: Final = 5000
DEFAULT_POSTGRES: Final = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
NOTIFY_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Mode:
    """How long to measure."""

    repetitions: int
    signing_seconds: float
    raw_batch_ns: int
    calibration_ns: int
    snapshot_entries: int
    snapshots: int
    creations: int


FULL: Final = Mode(
    repetitions=9,
    signing_seconds=2.0,
    raw_batch_ns=300_000_000,
    calibration_ns=40_000_000,
    snapshot_entries=50_000,
    snapshots=5,
    creations=200,
)
QUICK: Final = Mode(
    repetitions=3,
    signing_seconds=0.6,
    raw_batch_ns=100_000_000,
    calibration_ns=10_000_000,
    snapshot_entries=50_000,
    snapshots=2,
    creations=60,
)


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Rate:
    """Operations per second of one signing case, one sample per repetition."""

    name: str
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """The largest distance of one sample from the median, as a fraction of the median."""
        return max(abs(sample - self.median) for sample in self.samples) / self.median


@dataclass(frozen=True, slots=True, kw_only=True)
class Signing:
    one_batch: Rate
    concurrent: Rate
    raw_sign: Rate
    raw_check_sign: Rate

    def ours(self) -> tuple[Rate, Rate]:
        return self.one_batch, self.concurrent

    def best(self) -> Rate:
        return max(self.ours(), key=lambda rate: rate.median)


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    entries: int
    pages: int
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    name: str
    notified: list[float]
    acknowledged: list[float]

    def percentile(self, which: int, samples: Sequence[float] | None = None) -> float:
        values = sorted(self.notified if samples is None else samples)
        return statistics.quantiles(values, n=100, method="inclusive")[which - 1]


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    signing: Signing
    snapshot: Snapshot
    one_server: Latency
    two_servers: Latency
    setup: dict[str, float]


# --- the raw baselines: cryptography alone, in this process ------------------------------------


_SUBJECT: Final = x509.Name(
    [x509.NameAttribute(NameOID.COUNTRY_NAME, "US"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]
)
_KEY_USAGE: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=True,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_EKU: Final = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


@dataclass(frozen=True, slots=True, kw_only=True)
class RawCA:
    """A P-256 CA as the server makes by default: what the raw baselines sign with."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls) -> RawCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bench CA")])
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, certificate=certificate)

    def sign(self, spiffe_id: str, public_key: ec.EllipticCurvePublicKey) -> x509.Certificate:
        """An SVID with the server's template, built from scratch and signed."""
        now = datetime.now(UTC).replace(microsecond=0)
        ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(_SUBJECT)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(seconds=10))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_KEY_USAGE, critical=True)
            .add_extension(_EKU, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self.key, hashes.SHA256())
        )


def _check_csr(der: bytes) -> ec.EllipticCurvePublicKey:
    csr = x509.load_der_x509_csr(der)
    if not csr.is_signature_valid:
        raise ValueError("bad CSR signature")
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def raw_operations(ca: RawCA, csrs: Sequence[bytes]) -> tuple[Callable[[], object], Callable[[], object]]:
    """(build+sign, CSR check+build+sign), each cycling over the benchmark's CSRs."""
    keys = itertools.cycle([_check_csr(der) for der in csrs])
    ders = itertools.cycle(csrs)
    spiffe_id = f"spiffe://{TRUST_DOMAIN}/bench/raw"
    return (lambda: ca.sign(spiffe_id, next(keys))), (lambda: ca.sign(spiffe_id, _check_csr(next(ders))))


def _time_batch(operation: Callable[[], object], iterations: int) -> int:
    start = time.perf_counter_ns()
    for _ in itertools.repeat(None, iterations):
        operation()
    return time.perf_counter_ns() - start


def _calibrate(operation: Callable[[], object], mode: Mode) -> int:
    iterations = 1
    while (elapsed := _time_batch(operation, iterations)) < mode.calibration_ns:
        iterations *= 2
    return max(1, mode.raw_batch_ns * iterations // elapsed)


# --- servers, agents, entries -------------------------------------------------------------------


def _admin(server: ServerProcess) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"unix:{server.admin_socket}")


async def join(server: ServerProcess, admin: grpc.aio.Channel, *, address: str | None = None) -> AgentIdentity:
    """A new agent, attested with a join token made through the registration API."""
    stub = registration_pb2_grpc.RegistrationAPIStub(admin)
    token = (await stub.CreateJoinToken(registration_pb2.CreateJoinTokenRequest(ttl=600))).token
    bundle = bundle_from_proto(await stub.GetBundle(registration_pb2.GetBundleRequest()))
    return await attest(
        address or server.address,
        roots_pem=dump_pem_certificates(bundle.x509.authorities),
        attestation_type=JOIN_TOKEN,
        payload=token.encode(),
    )


def _entry(spiffe_id: str, parent: SpiffeID) -> types_pb2.Entry:
    return types_pb2.Entry(
        spiffe_id=spiffe_id, parent_id=str(parent), selectors=[types_pb2.Selector(type="unix", value="uid:1000")]
    )


async def create_entry(admin: grpc.aio.Channel, entry: types_pb2.Entry) -> types_pb2.Entry:
    stub = registration_pb2_grpc.RegistrationAPIStub(admin)
    created: types_pb2.Entry = await stub.CreateEntry(registration_pb2.CreateEntryRequest(entry=entry), timeout=10)
    return created


def bulk_create(database_url: str, parent: SpiffeID, count: int, prefix: str) -> None:
    """Set-up only: ``count`` entries under ``parent``, written with the store, 5,000 per transaction."""
    store = Store.open(database_url, migrate=False)
    try:
        for start in range(0, count, BULK_CHUNK):
            store.create_entries(
                [
                    RegistrationEntry(
                        spiffe_id=SpiffeID.parse(f"spiffe://{TRUST_DOMAIN}/{prefix}/{index}"),
                        parent_id=parent,
                        selectors=(Selector(type="unix", value=f"uid:{index}"),),
                    )
                    for index in range(start, min(start + BULK_CHUNK, count))
                ]
            )
    finally:
        store.close()


Arrival = tuple[float, WatchEvent | BaseException]


@contextlib.asynccontextmanager
async def watching(client: AgentAPIClient) -> AsyncIterator[asyncio.Queue[Arrival]]:
    """The agent's watch read by a task into a queue, each event with its arrival time."""
    queue: asyncio.Queue[Arrival] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for event in client.watch_entries():
                queue.put_nowait((time.perf_counter(), event))
        except Exception as err:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait((time.perf_counter(), err))

    task = asyncio.create_task(pump())
    try:
        yield queue
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def next_event(queue: asyncio.Queue[Arrival], timeout: float = NOTIFY_TIMEOUT) -> tuple[float, WatchEvent]:
    async with asyncio.timeout(timeout):
        at, event = await queue.get()
    if isinstance(event, BaseException):
        raise event
    return at, event


async def until_snapshot(queue: asyncio.Queue[Arrival]) -> None:
    while True:
        _, event = await next_event(queue)
        if isinstance(event, SnapshotPage) and event.last:
            return


# --- the measurements ---------------------------------------------------------------------------


async def _sign_for(client: AgentAPIClient, requests: Sequence[tuple[str, bytes]], seconds: float, width: int) -> float:
    """SVIDs per second with ``width`` batches in flight for about ``seconds``."""
    deadline = time.perf_counter() + seconds
    counts = [0] * width

    async def worker(slot: int) -> None:
        while time.perf_counter() < deadline:
            results = await client.batch_new_x509_svid(requests)
            if not all(result.ok for result in results):
                raise RuntimeError(f"a signing failed: {next(r.error for r in results if not r.ok)}")
            counts[slot] += len(results)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for slot in range(width):
            group.create_task(worker(slot))
    return sum(counts) / (time.perf_counter() - started)


async def measure_signing(server: ServerProcess, admin: grpc.aio.Channel, mode: Mode) -> Signing:
    agent = await join(server, admin)
    entries = [
        await create_entry(admin, _entry(f"spiffe://{TRUST_DOMAIN}/bench/signing/{index}", agent.svid.id))
        for index in range(BATCH)
    ]
    csrs = [make_csr(generate_key()) for _ in entries]
    requests = [(entry.id, csr) for entry, csr in zip(entries, csrs, strict=True)]
    raw_sign, raw_check_sign = raw_operations(RawCA.create(), csrs)
    raw_iterations = {"raw_sign": _calibrate(raw_sign, mode), "raw_check_sign": _calibrate(raw_check_sign, mode)}
    samples: dict[str, list[float]] = {"one_batch": [], "concurrent": [], "raw_sign": [], "raw_check_sign": []}
    async with AgentAPIClient(agent, server.address) as client:
        await _sign_for(client, requests, mode.signing_seconds / 2, CONCURRENT_BATCHES)  # warm-up

        async def one_batch() -> float:
            return await _sign_for(client, requests, mode.signing_seconds, 1)

        async def concurrent() -> float:
            return await _sign_for(client, requests, mode.signing_seconds, CONCURRENT_BATCHES)

        async def raw(name: str, operation: Callable[[], object]) -> float:
            iterations = raw_iterations[name]
            return iterations / (_time_batch(operation, iterations) / 1e9)

        cases: list[tuple[str, Callable[[], Any]]] = [
            ("one_batch", one_batch),
            ("concurrent", concurrent),
            ("raw_sign", lambda: raw("raw_sign", raw_sign)),
            ("raw_check_sign", lambda: raw("raw_check_sign", raw_check_sign)),
        ]
        for repetition in range(mode.repetitions):
            shift = repetition % len(cases)
            for name, run in [*cases[shift:], *cases[:shift]]:
                samples[name].append(await run())
    return Signing(
        one_batch=Rate(name="ours: 1 batch at a time", samples=samples["one_batch"]),
        concurrent=Rate(name=f"ours: {CONCURRENT_BATCHES} batches in flight", samples=samples["concurrent"]),
        raw_sign=Rate(name="raw sign (build + sign)", samples=samples["raw_sign"]),
        raw_check_sign=Rate(name="raw check+sign (CSR check + build + sign)", samples=samples["raw_check_sign"]),
    )


async def measure_latency(
    name: str, admin: grpc.aio.Channel, watcher: AgentAPIClient, parent: SpiffeID, count: int
) -> Latency:
    """Create ``count`` entries one at a time; time each until ``watcher``'s watch delivers it."""
    notified: list[float] = []
    acknowledged: list[float] = []
    run = uuid.uuid4().hex[:8]
    async with watching(watcher) as queue:
        await until_snapshot(queue)
        for index in range(-5, count):  # the first five warm up
            started = time.perf_counter()
            created = await create_entry(admin, _entry(f"spiffe://{TRUST_DOMAIN}/bench/latency/{run}/{index}", parent))
            acked = time.perf_counter()
            while True:
                arrived, event = await next_event(queue)
                if isinstance(event, EntryDeltas) and any(entry.id == created.id for entry in event.upserted):
                    break
            if index >= 0:
                notified.append(arrived - started)
                acknowledged.append(acked - started)
    return Latency(name=name, notified=notified, acknowledged=acknowledged)


async def _time_snapshot(client: AgentAPIClient) -> tuple[float, int, int]:
    """Seconds from opening the watch to the last snapshot page; entries and pages received."""
    started = time.perf_counter()
    events = client.watch_entries()
    entries = pages = 0
    try:
        async for event in events:
            if isinstance(event, SnapshotPage):
                entries += len(event.entries)
                pages += 1
                if event.last:
                    break
    finally:
        await events.aclose()
    return time.perf_counter() - started, entries, pages


async def measure_snapshot(server: ServerProcess, admin: grpc.aio.Channel, mode: Mode) -> tuple[Snapshot, float]:
    """The snapshot timing, and how long the set-up took until the agent's watch had every entry."""
    agent = await join(server, admin)
    count = mode.snapshot_entries
    async with AgentAPIClient(agent, server.address) as client:
        started = time.perf_counter()
        async with watching(client) as queue:
            await until_snapshot(queue)
            writer = asyncio.create_task(
                asyncio.to_thread(bulk_create, sqlite_url(server.data_dir), agent.svid.id, count, "bench/bulk")
            )
            received = 0
            while received < count:
                _, event = await next_event(queue, timeout=120)
                if isinstance(event, EntryDeltas):
                    received += len(event.upserted)
            await writer
        setup = time.perf_counter() - started
        seconds: list[float] = []
        for _ in range(mode.snapshots):
            elapsed, entries, pages = await _time_snapshot(client)
            if entries != count:
                raise RuntimeError(f"the snapshot held {entries} entries, not {count}")
            seconds.append(elapsed)
    return Snapshot(entries=count, pages=pages, seconds=seconds), setup


@contextlib.contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    """A new database with a unique name on the PostgreSQL server, dropped at the end; its URL."""
    url: URL = make_url(server_url)
    name = f"spiffe_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def running(data_dir: Path, **options: Any) -> Iterator[ServerProcess]:
    server = start_server(data_dir, **options)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()


async def _with_both_roots(client: AgentAPIClient, agent: AgentIdentity) -> AgentIdentity:
    """The agent's identity once its bundle holds both servers' roots (so it may call either)."""
    async with asyncio.timeout(NOTIFY_TIMEOUT):
        while len((bundle := await client.get_bundle()).x509.authorities) < 2:
            await asyncio.sleep(0.05)
    return AgentIdentity(svid=agent.svid, bundle=bundle, can_reattest=agent.can_reattest)


async def measure_two_servers(directory: Path, postgres: str, mode: Mode) -> Latency:
    with (
        postgres_database(postgres) as database_url,
        running(directory / "a", database_url=database_url) as a,
        running(directory / "b", database_url=database_url) as b,
    ):
        async with _admin(a) as admin:
            agent = await join(a, admin)
            async with AgentAPIClient(agent, a.address) as on_a:
                agent = await _with_both_roots(on_a, agent)
            async with AgentAPIClient(agent, b.address) as on_b:
                return await measure_latency(
                    "two servers (PostgreSQL): created on A, watched on B", admin, on_b, agent.svid.id, mode.creations
                )


async def run(mode: Mode, postgres: str) -> Report:
    setup: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="spiffe-bench-") as temporary:
        directory = Path(temporary)
        with running(directory / "one") as server:
            async with _admin(server) as admin:
                signing = await measure_signing(server, admin, mode)
                agent = await join(server, admin)
                async with AgentAPIClient(agent, server.address) as client:
                    one_server = await measure_latency(
                        "one server (SQLite)", admin, client, agent.svid.id, mode.creations
                    )
                snapshot, setup["snapshot_setup_s"] = await measure_snapshot(server, admin, mode)
        two_servers = await measure_two_servers(directory, postgres, mode)
    return Report(signing=signing, snapshot=snapshot, one_server=one_server, two_servers=two_servers, setup=setup)


# --- reporting ----------------------------------------------------------------------------------


def _environment(mode: Mode) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "openssl": backend.openssl_version_text(),
        "grpcio": grpc.__version__,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs (server and client share them)",
        "clock": "time.perf_counter (wall)",
        "signing": f"batches of {BATCH} P-256 CSRs, {mode.repetitions} repetitions of {mode.signing_seconds} s",
        "statistic": "median over repetitions",
    }


def verdicts(report: Report) -> list[Verdict]:
    signing = report.signing
    best = signing.best()
    ratio = best.median / signing.raw_sign.median
    ratio_checked = best.median / signing.raw_check_sign.median
    verdict_list = [
        Verdict(
            key="signing",
            met=ratio >= SIGNING_TARGET,
            text=(
                f"ours >= {SIGNING_TARGET:.0%} of raw sign: {ratio:.0%} ({best.name}, {best.median:,.0f}/s against "
                f"{signing.raw_sign.median:,.0f}/s); against raw check+sign {ratio_checked:.0%} (no target)"
            ),
        )
    ]
    for key, latency, target in (
        ("latency-one-server", report.one_server, ONE_SERVER_P99_TARGET),
        ("latency-two-servers", report.two_servers, TWO_SERVERS_P99_TARGET),
    ):
        p99 = latency.percentile(99)
        verdict_list.append(
            Verdict(key=key, met=p99 < target, text=f"p99 < {target * 1000:,.0f} ms: p99 {p99 * 1000:.1f} ms")
        )
    return verdict_list


def _signing_rows(signing: Signing) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("case", "SVIDs/s", "µs/SVID", "±", "of raw sign", "of raw check+sign")]
    for rate in (*signing.ours(), signing.raw_sign, signing.raw_check_sign):
        rows.append(
            (
                rate.name,
                f"{rate.median:,.0f}",
                f"{1e6 / rate.median:.1f}",
                f"{rate.spread:.0%}",
                f"{rate.median / signing.raw_sign.median:.0%}",
                f"{rate.median / signing.raw_check_sign.median:.0%}",
            )
        )
    return rows


def _latency_rows(latencies: Sequence[Latency]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("case", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "ack p50 ms")]
    for latency in latencies:
        rows.append(
            (
                latency.name,
                str(len(latency.notified)),
                *(f"{latency.percentile(which) * 1000:.1f}" for which in (50, 90, 99)),
                f"{max(latency.notified) * 1000:.1f}",
                f"{latency.percentile(50, latency.acknowledged) * 1000:.1f}",
            )
        )
    return rows


def render_text(report: Report, mode: Mode) -> str:
    snapshot = report.snapshot
    lines = [
        "spiffe-sidecar control-plane benchmark",
        *(f"  {key}: {value}" for key, value in _environment(mode).items()),
        "",
        f"X.509-SVID signing through BatchNewX509SVID (one agent, one mTLS connection, {BATCH} CSRs per batch);",
        "raw = cryptography in this process on one thread; ± = largest deviation from the median",
        *table(_signing_rows(report.signing)),
        "",
        "Entry snapshot: WatchEntries opened to last snapshot page received (server's default page size)",
        *table(
            [
                ("entries", "pages", "median s", "min s", "max s", "entries/s", "runs"),
                (
                    f"{snapshot.entries:,}",
                    str(snapshot.pages),
                    f"{snapshot.median:.2f}",
                    f"{min(snapshot.seconds):.2f}",
                    f"{max(snapshot.seconds):.2f}",
                    f"{snapshot.entries / snapshot.median:,.0f}",
                    str(len(snapshot.seconds)),
                ),
            ]
        ),
        f"  (set-up: store.create_entries from this process into the server's SQLite, 5,000 per transaction; "
        f"{report.setup['snapshot_setup_s']:.1f} s until the agent's watch had them all as deltas)",
        "",
        "Entry created (registration API, admin socket) to agent notified (WatchEntries delta); "
        "ack = CreateEntry returned",
        *table(_latency_rows([report.one_server, report.two_servers])),
        "",
    ]
    for verdict in verdicts(report):
        lines.append(f"{verdict.key}: target {verdict.text}: {'MET' if verdict.met else 'NOT MET'}")
    lines.append(f"snapshot: no target; {snapshot.entries:,} entries in {snapshot.median:.2f} s (median)")
    return "\n".join(lines)


def render_json(report: Report, mode: Mode) -> str:
    signing = report.signing
    document = {
        "environment": _environment(mode),
        "signing": {
            key: {
                "name": rate.name,
                "median_per_s": round(rate.median),
                "samples_per_s": [round(sample) for sample in rate.samples],
            }
            for key, rate in (
                ("one_batch", signing.one_batch),
                ("concurrent", signing.concurrent),
                ("raw_sign", signing.raw_sign),
                ("raw_check_sign", signing.raw_check_sign),
            )
        },
        "snapshot": {
            "entries": report.snapshot.entries,
            "pages": report.snapshot.pages,
            "seconds": [round(s, 4) for s in report.snapshot.seconds],
            "setup_seconds": round(report.setup["snapshot_setup_s"], 2),
        },
        "latency": {
            key: {
                "name": latency.name,
                **{f"p{which}_ms": round(latency.percentile(which) * 1000, 2) for which in (50, 90, 99)},
                "max_ms": round(max(latency.notified) * 1000, 2),
                "ack_p50_ms": round(latency.percentile(50, latency.acknowledged) * 1000, 2),
                "samples_ms": [round(s * 1000, 2) for s in latency.notified],
            }
            for key, latency in (("one_server", report.one_server), ("two_servers", report.two_servers))
        },
        "verdicts": {verdict.key: {"met": verdict.met, "text": verdict.text} for verdict in verdicts(report)},
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "X.509-SVID signings per second through BatchNewX509SVID next to raw cryptography, the time "
            "for an agent to receive a 50,000-entry snapshot, and entry-create-to-agent-notified latency on "
            "one server and across two, with real spiffe-server processes. Targets: signing >= "
            f"{SIGNING_TARGET:.0%} of raw; p99 latency < {ONE_SERVER_P99_TARGET * 1000:.0f} ms on one server, "
            f"< {TWO_SERVERS_P99_TARGET:.0f} s across two."
        )
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repetitions: about 45 s (full: ~3 min)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the tables")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("SPIFFE_BENCH_POSTGRES_URL", DEFAULT_POSTGRES),
        help="PostgreSQL server for the two-server case; a new database is created there and dropped "
        "(default: %(default)s)",
    )
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    report = asyncio.run(run(mode, args.postgres))
    print(render_json(report, mode) if args.json else render_text(report, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
