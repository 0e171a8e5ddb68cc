"""``spiffe-agent helper`` as a process: one-shot mode, and shutdown with a command running."""

from __future__ import annotations

import asyncio
import signal
import stat
import sys
from pathlib import Path

from spiffecore import X509SVID
from tests.sidecar.helper.conftest import Served, wait_for
from tests.support.server import script

PROGRAMS = str(Path(__file__).with_name("programs.py"))


async def _helper(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        script("spiffe-agent"), "helper", *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def test_once_writes_the_files_and_exits_0(served: Served, cert_dir: Path) -> None:
    process = await _helper("--once", "--socket", served.address, "--cert-dir", str(cert_dir))
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    svid = X509SVID.load_pem((cert_dir / "svid.pem").read_bytes(), (cert_dir / "svid_key.pem").read_bytes())
    assert svid == served.identities.entries[0].svid
    assert stat.S_IMODE((cert_dir / "svid_key.pem").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in stdout + stderr


async def test_once_writes_jwt_files_too(served: Served, cert_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "helper.yaml"
    config.write_text(
        f"socket: {served.address}\ncert_dir: {cert_dir}\njwt_bundle_file_name: jwks.json\n"
        "jwt_svids:\n  - {audience: db, file_name: db.jwt}\n"
    )
    process = await _helper("--config", str(config), "--once")
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    assert sorted(p.name for p in cert_dir.iterdir()) == [
        "bundle.pem",
        "db.jwt",
        "jwks.json",
        "svid.pem",
        "svid_key.pem",
    ]


async def test_once_without_an_identity_fails_with_a_clear_message(
    served: Served, cert_dir: Path, tmp_path: Path
) -> None:
    served.identities.remove_entries()
    config = tmp_path / "helper.yaml"
    config.write_text(f"socket: {served.address}\ncert_dir: {cert_dir}\nonce: true\nonce_timeout: 2s\n")
    process = await _helper("--config", str(config))
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    last = stderr.decode().splitlines()[-1]
    assert last.startswith("spiffe-agent: helper: no SVID within 2 s (last error: workloadapi: PERMISSION_DENIED:")
    assert "is there a registration entry whose selectors match it, such as unix:uid:" in last
    assert list(cert_dir.iterdir()) == []


async def test_a_bad_config_exits_2(tmp_path: Path) -> None:
    process = await _helper("--cert-dir", str(tmp_path), "--pid-file", "/run/x.pid")
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert "pid_file and signal must be set together" in stderr.decode()


async def test_sigint_is_forwarded_to_the_command_and_the_helper_exits_0(
    served: Served, cert_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "cmd.log"
    command = f"{sys.executable} {PROGRAMS} app {log}"
    process = await _helper("--socket", served.address, "--cert-dir", str(cert_dir), "--cmd", command)
    await wait_for(lambda: log.exists() and log.read_text().startswith("start "), "the command to start")
    pid = log.read_text().split()[1]
    process.send_signal(signal.SIGINT)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    assert log.read_text().splitlines() == [f"start {pid}", f"int {pid}"]
    assert stdout.decode().startswith(f"spiffe-agent helper: writing to {cert_dir} from unix:")
