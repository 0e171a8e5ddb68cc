"""The helper's loop against a real Workload API (the agent's service over a unix socket)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import stat
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidecar.helper.config import JWTSVIDFile
from spiffecore import JWTSVID, X509SVID, JWTBundle, JWTSVIDError, TrustDomain
from tests.sidecar.helper.conftest import PARTNER, RunHelper, Served, wait_for


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _svid(cert_dir: Path) -> X509SVID:
    return X509SVID.load_pem((cert_dir / "svid.pem").read_bytes(), (cert_dir / "svid_key.pem").read_bytes())


async def test_files_are_written_with_exact_modes_over_files_with_other_modes(
    served: Served, cert_dir: Path, run_helper: RunHelper
) -> None:
    for name, mode in {"svid.pem": 0o600, "svid_key.pem": 0o644, "bundle.pem": 0o400, "combined.pem": 0o777}.items():
        (cert_dir / name).write_text("stale")
        (cert_dir / name).chmod(mode)
    running = await run_helper(cert_file_mode=0o640, key_file_mode=0o400)
    await running.updates_past(0)
    expected = served.identities.entries[0].svid
    assert _svid(cert_dir) == expected
    assert (cert_dir / "bundle.pem").read_bytes() == served.identities.x509_bundle.pem()
    assert X509SVID.load_pem(*[(cert_dir / "combined.pem").read_bytes()] * 2) == expected
    modes = {p.name: _mode(p) for p in cert_dir.iterdir()}
    assert modes == {"svid.pem": 0o640, "svid_key.pem": 0o400, "bundle.pem": 0o640, "combined.pem": 0o400}
    # Read-only files (0400) do not stop the next write: each write replaces the file.
    served.identities.rotate()
    await running.updates_past(1)
    assert _mode(cert_dir / "svid_key.pem") == 0o400
    assert running.helper.readiness() == (True, "files written")


async def test_rotation_rewrites_the_files(served: Served, cert_dir: Path, run_helper: RunHelper) -> None:
    running = await run_helper()
    await running.updates_past(0)
    for count in range(1, 4):
        rotated = served.identities.rotate()
        await running.updates_past(count)
        assert _svid(cert_dir) == rotated


async def test_an_unchanged_context_rewrites_nothing(served: Served, cert_dir: Path, run_helper: RunHelper) -> None:
    running = await run_helper()
    await running.updates_past(0)
    inode = (cert_dir / "svid.pem").stat().st_ino
    served.identities.x509_bundle = served.identities.x509_bundle  # the same bundle, sent again
    served.identities.bump()
    await asyncio.sleep(0.5)
    assert running.helper.x509_updates == 1
    assert (cert_dir / "svid.pem").stat().st_ino == inode


async def test_federated_roots_go_into_the_bundle_file_when_asked(
    served: Served, cert_dir: Path, run_helper: RunHelper
) -> None:
    running = await run_helper(include_federated_bundles=True)
    await running.updates_past(0)
    partner = served.identities.federated_cas[TrustDomain.parse(PARTNER)]
    assert (cert_dir / "bundle.pem").read_bytes() == served.identities.x509_bundle.pem() + partner.x509_bundle().pem()


async def test_workload_api_errors_leave_the_old_files_and_it_reconnects(
    served: Served, cert_dir: Path, run_helper: RunHelper, caplog: pytest.LogCaptureFixture
) -> None:
    running = await run_helper()
    await running.updates_past(0)
    before = {p.name: p.read_bytes() for p in cert_dir.iterdir()}
    await served.server.stop(None)
    await wait_for(lambda: "X.509 context watch broke" in caplog.text, "the watch to break")
    assert {p.name: p.read_bytes() for p in cert_dir.iterdir()} == before
    await served.restart()
    rotated = served.identities.rotate()
    await running.updates_past(1)
    assert _svid(cert_dir) == rotated


async def test_no_identity_is_logged_clearly_and_the_files_stay(
    served: Served, cert_dir: Path, run_helper: RunHelper, caplog: pytest.LogCaptureFixture
) -> None:
    running = await run_helper()
    await running.updates_past(0)
    before = {p.name: p.read_bytes() for p in cert_dir.iterdir()}
    with caplog.at_level(logging.ERROR, logger="spiffe-agent.helper"):
        served.identities.remove_entries()
        await wait_for(lambda: "no X.509-SVID for this process" in caplog.text, "the refusal to be logged")
    record = next(
        r for r in caplog.records if r.getMessage() == "no X.509-SVID for this process; files left as they are"
    )
    assert "PERMISSION_DENIED" in record.reason  # type: ignore[attr-defined]
    assert "is there a registration entry whose selectors match it, such as unix:uid:" in record.reason  # type: ignore[attr-defined]
    assert {p.name: p.read_bytes() for p in cert_dir.iterdir()} == before
    assert running.helper.readiness()[0]  # the files are still good
    assert "PRIVATE KEY" not in caplog.text


async def test_a_failed_write_is_retried_and_the_key_stays_with_its_certificate(
    served: Served, cert_dir: Path, run_helper: RunHelper, caplog: pytest.LogCaptureFixture
) -> None:
    running = await run_helper()
    await running.updates_past(0)
    old = _svid(cert_dir)
    (cert_dir / "svid.pem").unlink()
    (cert_dir / "svid.pem").mkdir()  # a rename over a directory fails: as a write error would
    rotated = served.identities.rotate()
    await wait_for(lambda: "cannot write the X.509 files; retrying" in caplog.text, "the failure to be logged")
    assert (cert_dir / "svid_key.pem").read_bytes() == old.private_key_pem()  # never a key without its certificate
    shutil.rmtree(cert_dir / "svid.pem")
    await running.updates_past(1)
    assert _svid(cert_dir) == rotated


async def test_jwt_svid_files_are_refreshed_at_half_their_life(
    served: Served, cert_dir: Path, run_helper: RunHelper
) -> None:
    jwt = JWTSVIDFile(audience="db", extra_audiences=("cache",), file_name="db.jwt")
    running = await run_helper(jwt_svids=(jwt,), jwt_bundle_file_name="jwks.json")
    path = cert_dir / "db.jwt"
    await wait_for(path.exists, "the JWT file")
    first = path.read_text()
    assert _mode(path) == 0o600
    assert "\n" not in first
    token = JWTSVID.parse_and_validate(first, served.identities.jwt_bundle, "db", at=datetime.now(UTC))
    assert token.audience == ("db", "cache")
    # Tokens live 4 s: refreshed about every 2 s.
    await wait_for(lambda: path.read_text() != first, "the JWT-SVID to be refreshed", timeout=10)
    second = path.read_text()
    await wait_for(lambda: path.read_text() != second, "a second refresh", timeout=10)
    document = json.loads((cert_dir / "jwks.json").read_text())
    assert JWTBundle.load_jwks(served.identities.trust_domain, json.dumps(document["example.org"])) == (
        served.identities.jwt_bundle
    )
    await wait_for(lambda: running.helper.readiness()[0], "readiness")


async def test_jwt_errors_keep_the_old_file_and_are_retried(
    served: Served, cert_dir: Path, run_helper: RunHelper, caplog: pytest.LogCaptureFixture
) -> None:
    jwt = JWTSVIDFile(audience="db", file_name="db.jwt")
    await run_helper(jwt_svids=(jwt,))
    path = cert_dir / "db.jwt"
    await wait_for(path.exists, "the JWT file")
    first = path.read_text()
    served.identities.jwt_error = JWTSVIDError("the signer is down")
    await wait_for(lambda: "cannot fetch a JWT-SVID; the old file stays" in caplog.text, "the failure", timeout=10)
    assert path.read_text() == first
    served.identities.jwt_error = None
    await wait_for(lambda: path.read_text() != first, "the JWT-SVID to be refreshed after the error", timeout=15)


async def test_readiness_waits_for_every_file(served: Served, cert_dir: Path, run_helper: RunHelper) -> None:
    served.identities.remove_entries()
    running = await run_helper(jwt_svids=(JWTSVIDFile(audience="db", file_name="db.jwt"),))
    assert running.helper.readiness() == (False, "the X.509 files are not written yet")
    served.identities.add_entry("/web")
    await running.updates_past(0)
    await wait_for(lambda: running.helper.readiness()[0], "readiness")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a loopback http URL
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def test_the_health_endpoint_reports_readiness(served: Served, run_helper: RunHelper) -> None:
    served.identities.remove_entries()
    running = await run_helper(health="127.0.0.1:0")
    assert running.helper.status is not None
    host, port = running.helper.status.address
    assert await asyncio.to_thread(_get, f"http://{host}:{port}/healthz") == (200, "ok\n")
    assert await asyncio.to_thread(_get, f"http://{host}:{port}/readyz") == (
        503,
        "the X.509 files are not written yet\n",
    )
    served.identities.add_entry("/web")
    await running.updates_past(0)
    assert await asyncio.to_thread(_get, f"http://{host}:{port}/readyz") == (200, "files written\n")
