"""Small programs the helper's tests run as real processes: an application that logs its signals,
a TLS server that reloads its certificate on SIGHUP, and a reader that reads the files in a tight
loop. Each is run as ``python -m tests.sidecar.helper.programs <name> ...``.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from types import FrameType

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key


def _append(log: Path, line: str) -> None:
    with log.open("a") as out:
        out.write(line + "\n")


def app(log: Path, pid_file: Path | None = None) -> int:
    """Log "start PID", then each SIGHUP ("hup PID"); on SIGTERM/SIGINT log it and exit 0."""
    pid = os.getpid()
    if pid_file is not None:
        pid_file.write_text(f"{pid}\n")
    stopping: list[str] = []

    def on_signal(number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if number == signal.SIGHUP:
            _append(log, f"hup {pid}")
        else:
            stopping.append(name)

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    _append(log, f"start {pid}")
    while not stopping:
        time.sleep(0.02)
    _append(log, f"{stopping[0].removeprefix('SIG').lower()} {pid}")
    return 0


def tls_server(cert_dir: Path, pid_file: Path, log: Path) -> int:
    """Serve TLS on 127.0.0.1 with svid.pem/svid_key.pem; reload both on SIGHUP.

    Logs "port N" once listening, "reloaded SERIAL" after each reload, "reload failed REASON" if a
    reload fails (the old certificate stays). Each connection is closed right after its handshake.
    """

    def load() -> tuple[ssl.SSLContext, str]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_dir / "svid.pem", cert_dir / "svid_key.pem")
        leaf = x509.load_pem_x509_certificate((cert_dir / "svid.pem").read_bytes())
        return context, f"{leaf.serial_number:x}"

    reload = [False]
    stop = [False]

    def on_hup(number: int, frame: FrameType | None) -> None:
        reload[0] = True

    def on_term(number: int, frame: FrameType | None) -> None:
        stop[0] = True

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)
    wake_read, wake_write = socket.socketpair()  # a signal wakes select() at once
    wake_write.setblocking(False)
    signal.set_wakeup_fd(wake_write.fileno())
    context, serial = load()
    listener = socket.create_server(("127.0.0.1", 0))
    pid_file.write_text(f"{os.getpid()}\n")
    _append(log, f"port {listener.getsockname()[1]} serial {serial}")
    while not stop[0]:
        if reload[0]:
            reload[0] = False
            try:
                context, serial = load()
            except (ssl.SSLError, OSError, ValueError) as err:
                _append(log, f"reload failed {err}")
            else:
                _append(log, f"reloaded {serial}")
        readable, _, _ = select.select([listener, wake_read], [], [], 1.0)
        if wake_read in readable:
            wake_read.recv(512)
        if listener not in readable:
            continue
        connection, _ = listener.accept()
        connection.settimeout(5)
        try:
            with context.wrap_socket(connection, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            connection.close()
    return 0


def _fingerprint(public_key: PublicKeyTypes) -> str:
    der = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def reader(cert_dir: Path, combined: str, stop_file: Path, out: Path) -> int:
    """Until ``stop_file`` exists: read the key then the certificate, and the combined file.

    Writes a JSON report: reads, torn (a file that did not parse whole), the key/certificate pairs
    that did not match (fingerprints of the key read first and of the certificate read right
    after), combined-file mismatches, and every key fingerprint seen.
    """
    report: dict[str, object] = {}
    reads = torn = combined_mismatches = 0
    pair_mismatches: list[tuple[str, str]] = []
    seen: set[str] = set()
    while not stop_file.exists():
        reads += 1
        try:
            key = load_pem_private_key((cert_dir / "svid_key.pem").read_bytes(), password=None)
            chain = x509.load_pem_x509_certificates((cert_dir / "svid.pem").read_bytes())
            whole = (cert_dir / combined).read_bytes()
            combined_key = load_pem_private_key(whole, password=None)
            combined_chain = x509.load_pem_x509_certificates(whole)
        except (ValueError, TypeError):
            torn += 1
            continue
        key_fp = _fingerprint(key.public_key())
        cert_fp = _fingerprint(chain[0].public_key())
        seen.add(key_fp)
        if key_fp != cert_fp:
            pair_mismatches.append((key_fp, cert_fp))
        if _fingerprint(combined_key.public_key()) != _fingerprint(combined_chain[0].public_key()):
            combined_mismatches += 1
    report = {
        "reads": reads,
        "torn": torn,
        "pair_mismatches": pair_mismatches,
        "combined_mismatches": combined_mismatches,
        "keys_seen": sorted(seen),
    }
    out.write_text(json.dumps(report))
    return 0


def main(argv: list[str]) -> int:
    name, *args = argv
    if name == "app":
        return app(Path(args[0]), Path(args[1]) if len(args) > 1 else None)
    if name == "tls-server":
        return tls_server(Path(args[0]), Path(args[1]), Path(args[2]))
    if name == "reader":
        return reader(Path(args[0]), args[1], Path(args[2]), Path(args[3]))
    raise SystemExit(f"unknown program {name!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
