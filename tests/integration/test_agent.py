"""The node agent end to end: a real spiffe-server, a real spiffe-agent, workloads as separate processes.

One server and one agent serve the whole module (they are shared by tests that do not interfere);
the agent attested with a join token that aliases it as ``NODE``, and the workload entries, made
before it started, are parented by ``NODE``:

- uid 0 (root, which runs the tests and the CLI) is ``ROOT_ID``, with a 20 s X.509 TTL, so its
  SVID rotates every few seconds (renewed at 40-60% of 30 s, counting the 10 s backdating);
- uid 65534 (nobody) is ``NOBODY_ID``, uid 4243 is ``OTHER_ID``; uid 4244 has no entry.

Workloads running as other users are this venv's Python started as root, which imports what it
needs and then drops its ids before it connects (see :data:`tests.support.agent.DROP_IDS`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from sidecar.workload.service import HEADER_MISSING
from spiffecore import JWTSVID, X509SVID, SpiffeBundle, TrustDomain, X509Bundle, verify_x509_svid
from spiffeproto import workload_pb2, workload_pb2_grpc
from tests.support.agent import (
    AgentProcess,
    RunAs,
    agent_argv,
    finish_workload,
    free_port,
    http_get,
    read_event,
    remove_socket_dir,
    run_agent_cli,
    run_agent_to_exit,
    run_workload,
    running_agent,
    socket_dir,
    start_agent,
    start_workload,
    stop_workload,
    write_roots,
)
from tests.support.server import ServerProcess

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="workloads run as other users: the tests need root")

TD: Final = "spiffe://example.org"
NODE: Final = f"{TD}/node/agent-e2e"
ROOT_ID: Final = f"{TD}/e2e/root"
NOBODY_ID: Final = f"{TD}/e2e/nobody"
OTHER_ID: Final = f"{TD}/e2e/other"
NOBODY: Final = RunAs(65534, 65534)
OTHER: Final = RunAs(4243, 4243)
STRANGER: Final = RunAs(4244, 4244)
ROOT_TTL: Final = 20

# --- workload programs (separate processes) ---------------------------------------------------------

PY_SPIFFE: Final = r"""
import json
import queue

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from spiffe import JwtSvid, TrustDomain, WorkloadApiClient

DER, SPKI = Encoding.DER, PublicFormat.SubjectPublicKeyInfo


def emit(kind, **data):
    print(json.dumps({"kind": kind, **data}), flush=True)


def public(key):
    return key.public_bytes(encoding=DER, format=SPKI)


drop_ids()
with WorkloadApiClient(default_timeout=30) as client:
    context = client.fetch_x509_context()
    emit("x509_context", ids=[str(s.spiffe_id) for s in context.x509_svids])
    svid = client.fetch_x509_svid()
    emit(
        "x509_svid",
        id=str(svid.spiffe_id),
        key_matches=public(svid.private_key.public_key()) == public(svid.leaf.public_key()),
        chain=[cert.public_bytes(Encoding.PEM).decode() for cert in svid.cert_chain],
    )
    bundles = client.fetch_x509_bundles()
    emit(
        "x509_bundles",
        authorities={
            str(b.trust_domain): [a.public_bytes(Encoding.PEM).decode() for a in b.x509_authorities]
            for b in bundles.bundles
        },
    )
    jwt_svid = client.fetch_jwt_svid(audience={"db"})
    emit("jwt_svid", id=str(jwt_svid.spiffe_id), audience=sorted(jwt_svid.audience), token=jwt_svid.token)
    jwt_bundles = client.fetch_jwt_bundles()
    emit("jwt_bundles", kids={str(b.trust_domain): sorted(b.jwt_authorities) for b in jwt_bundles.bundles})
    own = jwt_bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
    emit("local_validation", id=str(JwtSvid.parse_and_validate(jwt_svid.token, own, {"db"}).spiffe_id))
    emit("validated", id=str(client.validate_jwt_svid(jwt_svid.token, "db").spiffe_id))
    try:
        client.validate_jwt_svid(jwt_svid.token, "other")
    except Exception as err:
        emit("rejected", error=type(err).__name__, message=str(err))

    updates = queue.Queue()
    watcher = client.stream_x509_contexts(
        on_success=lambda ctx: updates.put(ctx.default_svid.leaf.serial_number),
        on_error=lambda err: updates.put(repr(err)),
    )
    first = updates.get(timeout=30)
    emit("watching", serial=first)
    while True:
        item = updates.get(timeout=30)
        if isinstance(item, str):
            emit("watch_error", message=item)
            break
        if item != first:
            emit("rotated", serial=item)
            break
    watcher.cancel()
"""

# Our client, as a workload of any uid: what it gets, and what it is refused with which code.
IDENTITY: Final = r"""
import asyncio
import json
import os
import sys

from sidecar.workload.client import WorkloadAPIClient, WorkloadAPIError
from spiffecore import SpiffeID


def emit(kind, **data):
    print(json.dumps({"kind": kind, **data}), flush=True)


async def attempt(kind, call, describe):
    try:
        emit(kind, **describe(await call))
    except WorkloadAPIError as err:
        emit(kind, code=err.code.name, message=err.message)


async def main(other):
    async with WorkloadAPIClient(timeout=20) as client:
        drop_ids()
        emit("ids", uid=os.getuid(), gid=os.getgid())
        await attempt("x509", client.fetch_x509_context(), lambda c: {"ids": [str(s.id) for s in c.svids]})
        await attempt("bundles", client.fetch_x509_bundles(), lambda b: {"tds": sorted(td.name for td in b)})
        await attempt("jwt", client.fetch_jwt_svids(("db",)), lambda s: {"ids": [str(x.id) for x in s]})
        if other:
            wanted = client.fetch_jwt_svids(("db",), SpiffeID.parse(other))
            await attempt("jwt_other", wanted, lambda s: {"ids": [str(x.id) for x in s]})


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else ""))
"""


# --- the shared server and agent -------------------------------------------------------------------


@pytest.fixture(scope="module")
def token(server: ServerProcess) -> str:
    return server.token("--spiffe-id", NODE)


@pytest.fixture(scope="module")
def roots(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_roots(server, tmp_path_factory.mktemp("agent-roots") / "roots.pem")


@pytest.fixture(scope="module")
def entries(server: ServerProcess) -> dict[str, str]:
    """The workload entries of the module, made before the agent starts: SPIFFE ID by entry ID."""
    made: dict[str, str] = {}
    for spiffe_id, selector, extra in (
        (ROOT_ID, "unix:uid:0", ("--x509-ttl", str(ROOT_TTL))),
        (NOBODY_ID, f"unix:uid:{NOBODY.uid}", ()),
        (OTHER_ID, f"unix:uid:{OTHER.uid}", ()),
    ):
        document = server.cli_json(
            "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", NODE, "--selector", selector, *extra
        )
        made[document["id"]] = spiffe_id
    return made


@pytest.fixture(scope="module")
def agent(
    server: ServerProcess,
    token: str,
    roots: Path,
    entries: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AgentProcess]:
    sockets = socket_dir()
    try:
        with running_agent(
            tmp_path_factory.mktemp("agent") / "data",
            server.address,
            socket_path=sockets / "public" / "api.sock",
            join_token=token,
            trust_bundle=roots,
            status=f"127.0.0.1:{free_port()}",
        ) as process:
            yield process
    finally:
        remove_socket_dir(sockets)


def wait_ready(agent: AgentProcess, timeout: float = 30.0) -> list[int]:
    """Poll /readyz until 200; every status seen, in order."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        code, _ = http_get(agent.status_url("/readyz"))
        if not seen or seen[-1] != code:
            seen.append(code)
        if code == 200:
            return seen
        assert time.monotonic() < deadline, f"/readyz never turned 200: {seen}\n{agent.stderr}"
        time.sleep(0.05)


def metric(agent: AgentProcess, name: str) -> float:
    _, body = http_get(agent.status_url("/metrics"))
    for line in body.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name} in /metrics")


def x509_bundle(pems: list[str]) -> X509Bundle:
    return X509Bundle.load_pem(TrustDomain.parse("example.org"), "".join(pems).encode())


# --- readiness, identity and interop --------------------------------------------------------------


def test_the_agent_is_attested_as_the_token_says_and_turns_ready(agent: AgentProcess, entries: dict[str, str]) -> None:
    assert agent.agent_id.trust_domain.name == "example.org"
    assert str(agent.agent_id).startswith(f"{TD}/spire/agent/join_token/")
    seen = wait_ready(agent)
    assert seen[-1] == 200
    assert set(seen) <= {503, 200}, seen
    assert http_get(agent.status_url("/healthz"))[0] == 200
    # Ready means every workload entry of this agent has its SVID.
    assert metric(agent, "spiffe_agent_svids") == len(entries)


async def test_py_spiffe_fetches_everything_and_sees_a_rotation(agent: AgentProcess) -> None:
    """py-spiffe (PyPI ``spiffe``), unmodified, in its own process: every RPC, and a pushed rotation."""
    if importlib.util.find_spec("spiffe") is None:  # found, not imported: it clashes with our generated code
        pytest.fail("py-spiffe (the test extra's spiffe package) is not installed")
    process = await start_workload(PY_SPIFFE, endpoint=agent.endpoint)
    events: dict[str, dict[str, Any]] = {}
    try:
        while "watching" not in events:
            event = await read_event(process)
            events[event.pop("kind")] = event
        watching_since = time.monotonic()
        rotated = await read_event(process, timeout=ROOT_TTL + 10)
        await finish_workload(process)
    finally:
        await stop_workload(process)
    assert rotated["kind"] == "rotated", rotated
    assert rotated["serial"] != events["watching"]["serial"]
    # Rotation at 40-60% of 30 s after NotBefore (10 s backdated): well within the SVID's 20 s.
    assert time.monotonic() - watching_since < ROOT_TTL

    assert events["x509_context"] == {"ids": [ROOT_ID]}
    assert events["x509_svid"]["id"] == ROOT_ID
    assert events["x509_svid"]["key_matches"] is True
    assert list(events["x509_bundles"]["authorities"]) == ["example.org"]
    bundle = x509_bundle(events["x509_bundles"]["authorities"]["example.org"])
    chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in events["x509_svid"]["chain"]]
    verified = verify_x509_svid(chain, bundle, at=datetime.now(UTC))
    assert str(verified.id) == ROOT_ID
    assert events["jwt_svid"] == {"id": ROOT_ID, "audience": ["db"], "token": events["jwt_svid"]["token"]}
    assert list(events["jwt_bundles"]["kids"]) == ["example.org"]
    assert events["jwt_bundles"]["kids"]["example.org"], "the JWT bundle has no key"
    assert events["local_validation"] == {"id": ROOT_ID}
    assert events["validated"] == {"id": ROOT_ID}
    assert events["rejected"]["error"] == "ValidateJwtSvidError"
    assert "audience" in events["rejected"]["message"]
    # The token is a real JWT-SVID of the trust domain, whoever checks it.
    parsed = JWTSVID.parse_insecure(events["jwt_svid"]["token"], "db", at=datetime.now(UTC))
    assert str(parsed.id) == ROOT_ID


async def test_two_users_get_their_own_identities_and_never_each_others(agent: AgentProcess) -> None:
    nobody = {e.pop("kind"): e for e in await run_workload(IDENTITY, OTHER_ID, endpoint=agent.endpoint, run_as=NOBODY)}
    other = {e.pop("kind"): e for e in await run_workload(IDENTITY, NOBODY_ID, endpoint=agent.endpoint, run_as=OTHER)}

    assert nobody["ids"] == {"uid": NOBODY.uid, "gid": NOBODY.gid}
    assert nobody["x509"] == {"ids": [NOBODY_ID]}
    assert nobody["bundles"] == {"tds": ["example.org"]}
    assert nobody["jwt"] == {"ids": [NOBODY_ID]}
    assert nobody["jwt_other"]["code"] == "PERMISSION_DENIED", nobody["jwt_other"]

    assert other["ids"] == {"uid": OTHER.uid, "gid": OTHER.gid}
    assert other["x509"] == {"ids": [OTHER_ID]}
    assert other["jwt"] == {"ids": [OTHER_ID]}
    assert other["jwt_other"]["code"] == "PERMISSION_DENIED", other["jwt_other"]


async def test_a_workload_that_matches_no_entry_is_denied(agent: AgentProcess) -> None:
    events = {e.pop("kind"): e for e in await run_workload(IDENTITY, endpoint=agent.endpoint, run_as=STRANGER)}
    assert events["ids"] == {"uid": STRANGER.uid, "gid": STRANGER.gid}
    for kind in ("x509", "bundles", "jwt"):
        assert events[kind] == {"code": "PERMISSION_DENIED", "message": "no identity issued"}, kind


async def test_a_call_without_the_security_header_is_an_invalid_argument(agent: AgentProcess) -> None:
    async with grpc.aio.insecure_channel(f"unix:{agent.socket}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stream.read()
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == HEADER_MISSING
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["db"]), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == HEADER_MISSING


# --- the workload commands -----------------------------------------------------------------------


def test_api_fetch_x509_writes_the_svid_key_and_bundle(agent: AgentProcess, tmp_path: Path) -> None:
    out = tmp_path / "svid"
    result = agent.api("fetch", "x509", "--write", str(out))
    assert result.stdout.startswith(f"SVID 0: {ROOT_ID}\n"), result.stdout
    assert "bundles: example.org" in result.stdout
    files = {path.name: path for path in out.iterdir()}
    assert sorted(files) == ["bundle.pem", "svid.pem", "svid_key.pem"]
    assert stat.S_IMODE(files["svid_key.pem"].stat().st_mode) == 0o600
    for name in ("svid.pem", "bundle.pem"):
        assert stat.S_IMODE(files[name].stat().st_mode) == 0o644
    svid = X509SVID.load_pem(files["svid.pem"].read_bytes(), files["svid_key.pem"].read_bytes())
    assert str(svid.id) == ROOT_ID
    bundle = X509Bundle.load_pem(svid.id.trust_domain, files["bundle.pem"].read_bytes())
    assert verify_x509_svid(list(svid.cert_chain), bundle, at=datetime.now(UTC)).id == svid.id


def test_api_fetch_jwt_then_validate_it(agent: AgentProcess) -> None:
    token = agent.api("fetch", "jwt", "--audience", "db").stdout.strip()
    assert str(JWTSVID.parse_insecure(token, "db", at=datetime.now(UTC)).id) == ROOT_ID
    assert agent.api("validate", "jwt", "--audience", "db", "--svid", token).stdout == f"valid: {ROOT_ID}\n"
    document = json.loads(agent.api("validate", "jwt", "--audience", "db", "--svid", token, "--output", "json").stdout)
    assert document["spiffe_id"] == ROOT_ID
    assert document["claims"]["aud"] == ["db"]
    refused = agent.api("validate", "jwt", "--audience", "other", "--svid", token, check=False)
    assert refused.returncode == 1, refused.describe()
    assert refused.stderr.startswith("spiffe-agent: workloadapi: INVALID_ARGUMENT: jwtsvid: "), refused.stderr
    assert "audience" in refused.stderr


def test_api_watch_prints_an_update_on_rotation(agent: AgentProcess) -> None:
    watch = subprocess.Popen(  # noqa: S603 - our own console script
        [*agent_argv(Path())[:1], "api", "watch", "--output", "json", "--socket", agent.endpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watch.stdout is not None
    serials: list[str] = []
    try:
        deadline = time.monotonic() + ROOT_TTL + 10
        while len(set(serials)) < 2:
            assert time.monotonic() < deadline, f"no rotation printed: {serials}"
            line = watch.stdout.readline()
            assert line, f"api watch ended: {watch.stderr.read() if watch.stderr else ''}"
            document = json.loads(line)
            assert [svid["spiffe_id"] for svid in document["svids"]] == [ROOT_ID]
            serials.append(document["svids"][0]["serial"])
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=10) == 130
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        watch.stdout.close()
        if watch.stderr is not None:
            watch.stderr.close()
    assert len(serials) == 2, "an update was printed twice"


def test_healthcheck_is_zero_against_the_agent_and_not_without_one(agent: AgentProcess) -> None:
    healthy = run_agent_cli("healthcheck", "--socket", agent.endpoint)
    assert (healthy.returncode, healthy.stdout) == (0, "healthy\n"), healthy.describe()
    nowhere = socket_dir()
    try:
        sick = run_agent_cli("healthcheck", "--socket", f"unix://{nowhere}/api.sock")
    finally:
        remove_socket_dir(nowhere)
    assert sick.returncode == 1, sick.describe()
    assert sick.stderr.startswith("spiffe-agent: workloadapi: UNAVAILABLE: "), sick.stderr


@pytest.mark.parametrize("form", ["unix://{}", "unix:{}"])
def test_spiffe_endpoint_socket_is_honoured(agent: AgentProcess, form: str) -> None:
    env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": form.format(agent.socket)}
    result = run_agent_cli("api", "fetch", "x509", "--output", "json", env=env)
    assert result.returncode == 0, result.describe()
    assert [svid["spiffe_id"] for svid in json.loads(result.stdout)["svids"]] == [ROOT_ID]
    health = run_agent_cli("healthcheck", env=env)
    assert health.returncode == 0, health.describe()


# --- start-up: configuration, join tokens, trust bootstrap ----------------------------------------------


def test_run_with_a_bad_config_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("trust_domain: example.org\nserver: 127.0.0.1:1\nbogus: 1\n")
    result = run_agent_to_exit(agent_argv(tmp_path / "data", trust_domain=None, config=config))
    assert result.returncode == 2, result.describe()
    assert result.stderr.startswith(f'spiffe-agent: config: {config}:3: unknown key "bogus" (known: '), result.stderr
    assert result.stderr.count("\n") == 1, "one line, no traceback"
    missing = run_agent_to_exit(agent_argv(tmp_path / "data", trust_domain=None))
    assert missing.returncode == 2, missing.describe()
    assert missing.stderr == "spiffe-agent: config: --trust-domain is required when no --config file is given\n"


def test_run_with_a_used_join_token_exits_non_zero_and_says_to_generate_a_new_one(
    agent: AgentProcess, server: ServerProcess, token: str, roots: Path, tmp_path: Path
) -> None:
    sockets = socket_dir()
    try:
        argv = agent_argv(
            tmp_path / "data",
            server=server.address,
            join_token=token,  # the shared agent attested with it
            trust_bundle=roots,
            socket_path=sockets / "api.sock",
        )
        result = run_agent_to_exit(argv)
    finally:
        remove_socket_dir(sockets)
    assert result.returncode == 1, result.describe()
    assert "spiffe-agent cannot start: node: the join token was refused" in result.stderr, result.stderr
    assert "generate a new one with 'spiffe-server token generate'" in result.stderr
    assert token not in result.stderr, "the token must not be logged"
    assert result.stdout == ""


def test_insecure_bootstrap_works_and_warns_with_the_root_fingerprint(server: ServerProcess, tmp_path: Path) -> None:
    roots = x509.load_pem_x509_certificates(server.roots_pem())
    fingerprints = {root.fingerprint(hashes.SHA256()).hex(":").upper() for root in roots}
    sockets = socket_dir()
    try:
        agent = start_agent(
            tmp_path / "data",
            server.address,
            socket_path=sockets / "api.sock",
            join_token=server.token("--spiffe-id", f"{TD}/node/insecure"),
            insecure_bootstrap=True,
        )
        try:
            health = run_agent_cli("healthcheck", "--socket", agent.endpoint)
            assert health.returncode == 0, health.describe()
        finally:
            agent.stop()
    finally:
        remove_socket_dir(sockets)
    warnings = [line for line in agent.stderr.splitlines() if " WARNING " in line and "INSECURE BOOTSTRAP" in line]
    assert len(warnings) == 1, agent.stderr
    assert any(f"sha256={fingerprint}" in warnings[0] for fingerprint in fingerprints), warnings[0]
    # After attesting, the agent trusts the bundle the server sent, persisted for its next start.
    persisted = SpiffeBundle.parse(TrustDomain.parse("example.org"), (tmp_path / "data" / "bundle.json").read_bytes())
    assert set(persisted.x509.authorities) == set(roots)
