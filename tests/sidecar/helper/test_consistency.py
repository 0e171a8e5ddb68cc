"""Readers racing the helper: never a torn file, never a new key with an old certificate, and the
combined file always consistent."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from spiffecore import X509SVID
from tests.sidecar.helper.conftest import RunHelper, Served, wait_for

PROGRAMS = str(Path(__file__).with_name("programs.py"))
ROTATIONS = 60


def _fingerprint(svid: X509SVID) -> str:
    der = svid.leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


async def test_a_reader_in_a_tight_loop_never_sees_a_torn_file_or_a_newer_key(
    served: Served, cert_dir: Path, tmp_path: Path, run_helper: RunHelper
) -> None:
    running = await run_helper()
    await running.updates_past(0)
    order = [_fingerprint(served.identities.entries[0].svid)]
    stop_file, report_file = tmp_path / "stop", tmp_path / "report.json"
    reader = await asyncio.create_subprocess_exec(
        sys.executable, PROGRAMS, "reader", str(cert_dir), "combined.pem", str(stop_file), str(report_file)
    )
    try:
        for count in range(1, ROTATIONS + 1):
            order.append(_fingerprint(served.identities.rotate()))
            await running.updates_past(count)
    finally:
        stop_file.touch()
        await asyncio.wait_for(reader.wait(), 30)
    assert reader.returncode == 0
    report = json.loads(report_file.read_text())
    assert report["torn"] == 0
    assert report["combined_mismatches"] == 0
    assert report["reads"] > ROTATIONS
    assert len(report["keys_seen"]) > ROTATIONS // 4, report  # the reader really raced the rotations
    position = {fingerprint: index for index, fingerprint in enumerate(order)}
    for key, cert in report["pair_mismatches"]:
        # The certificate is written before the key, so the key read first is never the newer one.
        assert position[key] < position[cert], (key, cert)
    await wait_for(lambda: running.helper.x509_updates == ROTATIONS + 1, "the last write")
