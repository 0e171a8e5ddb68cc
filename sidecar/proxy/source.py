"""Identity sources for the proxy, behind :class:`sidecar.workload.source.X509SourceProtocol`.

The Workload API source is :class:`sidecar.workload.source.X509Source` following a Workload API
watch; nothing of it is repeated here. :func:`file_source` gives the same interface over PEM
files (``--cert``, ``--key``, ``--bundle``): :class:`PEMFiles` reads them, and its :meth:`~PEMFiles.watch`
yields a new context whenever a file's modification time, size or inode changes (polled; a
rename over the file, as rotation tools do, changes the inode) or :meth:`~PEMFiles.reload` is
called (on SIGHUP, later). A bad reload, such as a key that does not match its certificate or a
half-written file, is logged with its reason and skipped: the source keeps the identity it had.

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


@dataclass(slots=True)
class PEMFiles:
    """A certificate chain, its private key and a trust bundle, in PEM files."""

    cert: Path
    key: Path
    bundle: Path
    poll_interval: float = DEFAULT_POLL_INTERVAL
    _reload: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

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
        self._reload.set()

    async def watch(self) -> AsyncIterator[X509Context]:
        """The files' context now, then again after every change; bad versions are logged and skipped.

        The first load's error is raised (as a :class:`SpiffeError`), so the source reports it.
        """
        stamp = self._stamp()
        yield self.load()
        while True:
            try:
                async with asyncio.timeout(self.poll_interval):
                    await self._reload.wait()
                forced = True
            except TimeoutError:
                forced = False
            self._reload.clear()
            new_stamp = self._stamp()
            if not forced and new_stamp == stamp:
                continue
            stamp = new_stamp
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

    def _stamp(self) -> _Stamp:
        stamps = []
        for path in (self.cert, self.key, self.bundle):
            try:
                st = path.stat()
            except OSError:
                stamps.append((0, 0, 0, 0))
                continue
            stamps.append((st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size))
        return tuple(stamps)


def file_source(files: PEMFiles) -> X509Source:
    """An :class:`X509Source` over PEM files; ``await source.ready()`` after starting it."""
    return X509Source(files.watch)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ProxyConfigError(f"could not read the {what} file ({os.strerror(err.errno or 0)})", str(path)) from err
