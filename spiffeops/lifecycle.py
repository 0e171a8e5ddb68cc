"""Helpers for asyncio mains: waiting for a shutdown signal, writing private files safely."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Final

__all__ = ["wait_for_shutdown_signal", "write_atomically"]

_TEMP_ATTEMPTS: Final = 10


async def wait_for_shutdown_signal(
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> signal.Signals:
    """Wait until the process receives one of ``signals`` and return which.

    Installs event-loop signal handlers for the wait only: afterwards (also when the wait is
    cancelled) they are removed and the handlers that were there before are put back, so a second
    Ctrl-C during a graceful drain interrupts as usual. One waiter per signal at a time.
    """
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig)

    previous: list[tuple[signal.Signals, signal._HANDLER]] = []
    try:
        for number in signals:
            sig = signal.Signals(number)
            before = signal.getsignal(sig)
            loop.add_signal_handler(sig, on_signal, sig)
            previous.append((sig, before))
        return await received
    finally:
        for sig, before in reversed(previous):
            loop.remove_signal_handler(sig)
            if before is not None:
                signal.signal(sig, before)


def write_atomically(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Replace the file at ``path`` with ``data`` atomically, readable only as ``mode`` allows.

    The default mode, 0600, is the one for private keys; public files (certificates, bundles)
    pass their own.

    The data goes to a new file in the same directory, created with ``mode`` (set exactly, whatever
    the umask) before a byte is written, then flushed to disk and renamed over ``path``; the
    directory is flushed too. Readers see the old file or the new one, never a part, and the new
    one has ``mode`` even if the old one was more open. A symbolic link at ``path`` is replaced,
    not followed. Private keys are written only through this function.
    """
    if mode & ~0o777:
        raise ValueError(f"lifecycle: mode must be permission bits only, got {oct(mode)}")
    target = Path(path)
    directory = target.parent
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    for _ in range(_TEMP_ATTEMPTS):
        temp = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(temp, flags, mode)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(f"lifecycle: could not create a temporary file beside {os.fspath(target)!r}")
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits away; never adds any beyond mode
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        temp.replace(target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
