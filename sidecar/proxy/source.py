"""Identity sources for the proxy, behind :class:`sidecar.workload.source.X509SourceProtocol`.

The Workload API source is :class:`sidecar.workload.source.X509Source` following a Workload API
watch; nothing of it is repeated here. :func:`file_source` gives the same interface over PEM
files (``--cert``, ``--key``, ``--bundle``): :class:`PEMFiles` reads them, and its :meth:`~PEMFiles.watch`
yields a new context whenever a file's modification time, size or inode changes (polled; a
rename over the file, as rotation tools do, changes the inode) or :meth:`~PEMFiles.reload` is
called (on SIGHUP). A bad reload, such as a key that does not match its certificate or a
half-written file, is logged with its reason and skipped: the source keeps the identity it had.
That polling is :class:`FileWatch`, which the policy file (``--policy``) follows too.

The bundle file holds the X.509 authorities of the SVID's own trust domain.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from sidecar.proxy.errors import ProxyConfigError
from sidecar.workload.identities import X509Context
from sidecar.workload.source import X509Source
from spiffecore import X509SVID, SpiffeError, X509Bundle

DEFAULT_POLL_INTERVAL: Final = 1.0

_log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int, int], ...]


class FileWatch:
    """Changes to a set of files, polled: a file's inode, device, modification time or size.

    :meth:`mark` takes the files' stamp now (call it before reading them); :meth:`changed` returns
    once a stamp differs from the last one taken, or at the next poll after :meth:`poke` (a
    forced reload, on SIGHUP), and takes the new stamp. A missing file has a stamp of its own, so
    its deletion and its return are changes too.
    """

    def __init__(self, paths: tuple[Path, ...], poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        self.paths = paths
        self.poll_interval = poll_interval
        self._poked = asyncio.Event()
        self._stamp = self.stamp()

    def stamp(self) -> _Stamp:
        stamps = []
        for path in self.paths:
            try:
                st = path.stat()
            except OSError:
                stamps.append((0, 0, 0, 0))
                continue
            stamps.append((st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def mark(self) -> None:
        self._stamp = self.stamp()

    def poke(self) -> None:
        """Make :meth:`changed` return at once, whether or not a file changed."""
        self._poked.set()

    async def changed(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.poll_interval):
                    await self._poked.wait()
                forced = True
            except TimeoutError:
                forced = False
            self._poked.clear()
            stamp = self.stamp()
            if forced or stamp != self._stamp:
                self._stamp = stamp
                return


@dataclass(slots=True)
class PEMFiles:
    """A certificate chain, its private key and a trust bundle, in PEM files."""

    cert: Path
    key: Path
    bundle: Path
    poll_interval: float = DEFAULT_POLL_INTERVAL
    _watch: FileWatch = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._watch = FileWatch((self.cert, self.key, self.bundle), self.poll_interval)

    def load(self) -> X509Context:
        """Read and check the three files; :class:`ProxyConfigError` naming the file and the rule."""
        cert_pem = _read(self.cert, "certificate")
        key_pem = _read(self.key, "private key")
        bundle_pem = _read(self.bundle, "bundle")
        try:
            svid = X509SVID.load_pem(cert_pem, key_pem)
        except SpiffeError as err:
            raise ProxyConfigError(f"could not load the SVID from {self.cert} and {self.key} ({err})") from err
        try:
            bundle = X509Bundle.load_pem(svid.id.trust_domain, bundle_pem)
        except SpiffeError as err:
            raise ProxyConfigError(f"could not load the bundle from {self.bundle} ({err})") from err
        return X509Context(svids=(svid,), bundle=bundle, federated={})

    def reload(self) -> None:
        """Read the files again now (the watch yields the new context if they are valid)."""
        self._watch.poke()

    async def watch(self) -> AsyncIterator[X509Context]:
        """The files' context now, then again after every change; bad versions are logged and skipped.

        The first load's error is raised (as a :class:`SpiffeError`), so the source reports it.
        """
        self._watch.mark()
        yield self.load()
        while True:
            await self._watch.changed()
            try:
                context = self.load()
            except ProxyConfigError as err:
                _log.error(
                    "reloading the identity files failed; keeping the current identity", extra={"reason": str(err)}
                )
                continue
            _log.info(
                "identity files reloaded",
                extra={"spiffe_id": str(context.svids[0].id), "expires_at": context.svids[0].expires_at.isoformat()},
            )
            yield context


def file_source(files: PEMFiles) -> X509Source:
    """An :class:`X509Source` over PEM files; ``await source.ready()`` after starting it."""
    return X509Source(files.watch)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ProxyConfigError(f"could not read the {what} file ({os.strerror(err.errno or 0)})", str(path)) from err
