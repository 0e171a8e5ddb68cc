"""Interoperability: the real py-spiffe client, in its own process, against our service.

py-spiffe registers the Workload API's message names in protobuf's default pool, as our generated
module does, so the two cannot share a process (a real workload is another process anyway). The
workload program below reports what it saw as JSON lines; the test answers by rotating the SVID
once the program's stream watcher has its first update.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from typing import Any, Final

import pytest

from tests.sidecar.workload.conftest import Served

# Found, not imported: importing it here would clash with our generated messages.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("spiffe") is None, reason="py-spiffe (the test extra's spiffe package) is not installed"
)

WORKLOAD: Final = r"""
import json
import queue

from spiffe import JwtSvid, TrustDomain, WorkloadApiClient


def emit(kind, **data):
    print(json.dumps({"kind": kind, **data}), flush=True)


def public(key):
    return key.public_bytes(encoding=DER, format=SPKI)


from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DER, SPKI = Encoding.DER, PublicFormat.SubjectPublicKeyInfo

with WorkloadApiClient(default_timeout=30) as client:
    context = client.fetch_x509_context()
    emit(
        "x509_context",
        ids=[str(svid.spiffe_id) for svid in context.x509_svids],
        default=str(context.default_svid.spiffe_id),
        trust_domains=sorted(str(bundle.trust_domain) for bundle in context.x509_bundle_set.bundles),
    )
    svid = client.fetch_x509_svid()
    emit(
        "x509_svid",
        id=str(svid.spiffe_id),
        serial=svid.leaf.serial_number,
        key_matches=public(svid.private_key.public_key()) == public(svid.leaf.public_key()),
    )
    bundles = client.fetch_x509_bundles()
    emit(
        "x509_bundles",
        authorities={str(b.trust_domain): len(b.x509_authorities) for b in bundles.bundles},
    )
    jwt_svid = client.fetch_jwt_svid(audience={"db"})
    emit("jwt_svid", id=str(jwt_svid.spiffe_id), audience=sorted(jwt_svid.audience))
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


async def read_event(stream: asyncio.StreamReader) -> dict[str, Any]:
    line = await asyncio.wait_for(stream.readline(), 60)
    assert line, "the workload program ended early"
    event: dict[str, Any] = json.loads(line)
    return event


async def test_py_spiffe_client_against_our_service(served: Served) -> None:
    env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": f"unix://{served.socket}"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKLOAD, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    assert process.stderr is not None
    events: dict[str, dict[str, Any]] = {}
    try:
        while "watching" not in events:
            try:
                event = await read_event(process.stdout)
            except AssertionError:
                raise AssertionError((await process.stderr.read()).decode()) from None
            events[event.pop("kind")] = event
        rotated = served.identities.rotate(0)
        event = await read_event(process.stdout)
        assert event == {"kind": "rotated", "serial": rotated.leaf.serial_number}
        assert await asyncio.wait_for(process.wait(), 30) == 0, (await process.stderr.read()).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    web, ext = "spiffe://example.org/web", "spiffe://example.org/web-ext"
    assert events["x509_context"] == {
        "ids": [web, ext],
        "default": web,
        "trust_domains": ["example.org", "partner.org"],
    }
    assert events["x509_svid"] == {
        "id": web,
        "serial": events["watching"]["serial"],
        "key_matches": True,
    }
    assert events["x509_bundles"] == {"authorities": {"example.org": 1, "partner.org": 1}}
    assert events["jwt_svid"] == {"id": web, "audience": ["db"]}
    assert events["jwt_bundles"] == {"kids": {"example.org": ["jwt-key-1"], "partner.org": ["jwt-key-1"]}}
    assert events["local_validation"] == {"id": web}
    assert events["validated"] == {"id": web}
    assert events["rejected"]["error"] == "ValidateJwtSvidError"
    assert 'jwtsvid: token audience does not include \\"other\\"' in json.dumps(events["rejected"]["message"])
