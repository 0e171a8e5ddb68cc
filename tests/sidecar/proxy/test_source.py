"""The PEM-files identity source: load, reload on change and on request, keep the old identity on a bad reload."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from sidecar.proxy.errors import ProxyConfigError
from sidecar.proxy.source import PEMFiles, file_source
from spiffecore import X509SVID
from tests.support.ca import TestCA


def write(directory: Path, svid: X509SVID, ca: TestCA, *, atomic: bool = True) -> PEMFiles:
    files = PEMFiles(directory / "cert.pem", directory / "key.pem", directory / "bundle.pem", poll_interval=0.05)
    for path, data in (
        (files.cert, svid.cert_chain_pem()),
        (files.key, svid.private_key_pem()),
        (files.bundle, ca.x509_bundle().pem()),
    ):
        if atomic:  # as rotation tools do: write aside, rename over
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        else:
            path.write_bytes(data)
    return files


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def test_load_reads_the_three_files(tmp_path: Path) -> None:
    ca = TestCA.create()
    svid = ca.mint("/web").svid()
    context = write(tmp_path, svid, ca).load()
    assert context.svids == (svid,)
    assert context.bundle == ca.x509_bundle()


def test_load_names_the_missing_file(tmp_path: Path) -> None:
    ca = TestCA.create()
    files = write(tmp_path, ca.mint().svid(), ca)
    files.key.unlink()
    with pytest.raises(ProxyConfigError) as info:
        files.load()
    assert str(info.value) == f'proxy: could not read the private key file (No such file or directory): "{files.key}"'


async def test_rotation_by_rename_is_picked_up(tmp_path: Path) -> None:
    ca = TestCA.create()
    files = write(tmp_path, ca.mint("/web").svid(), ca)
    async with file_source(files) as source:
        await source.ready(5)
        assert str(source.svid().id) == "spiffe://example.org/web"
        write(tmp_path, ca.mint("/web-2").svid(), ca)
        await wait_for(lambda: str(source.svid().id) == "spiffe://example.org/web-2")


async def test_bad_reload_keeps_the_identity_and_logs_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = TestCA.create()
    good = ca.mint("/web").svid()
    files = write(tmp_path, good, ca)
    async with file_source(files) as source:
        await source.ready(5)
        with caplog.at_level(logging.ERROR, logger="sidecar.proxy.source"):
            files.key.write_bytes(ca.mint("/other").svid().private_key_pem())  # a key of another certificate
            files.reload()
            await wait_for(lambda: any("keeping the current identity" in r.getMessage() for r in caplog.records))
        assert source.svid() is source.svid()
        assert source.svid() == good
        reason = next(getattr(r, "reason", "") for r in caplog.records)
        assert reason.startswith(f"proxy: could not load the SVID from {files.cert} and {files.key}")
        # A later good version is taken.
        write(tmp_path, ca.mint("/web-3").svid(), ca)
        await wait_for(lambda: str(source.svid().id) == "spiffe://example.org/web-3")


async def test_explicit_reload_reads_even_an_unchanged_stamp(tmp_path: Path) -> None:
    ca = TestCA.create()
    files = write(tmp_path, ca.mint("/web").svid(), ca)
    files.poll_interval = 3600.0  # only reload() can make it look
    async with file_source(files) as source:
        await source.ready(5)
        stat = files.cert.stat()
        write(tmp_path, ca.mint("/web-4").svid(), ca, atomic=False)
        os.utime(files.cert, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        files.reload()
        await wait_for(lambda: str(source.svid().id) == "spiffe://example.org/web-4")
