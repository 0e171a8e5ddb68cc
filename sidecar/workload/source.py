"""X.509 sources: the latest X.509-SVIDs and bundles, kept current.

:class:`X509SourceProtocol` is the X.509 source interface the proxy depends on (architecture rule
4): the default SVID or one by hint, the bundles as a :class:`~spiffecore.BundleSet` (what
``spiffecore.tls`` builds contexts from and ``verify_x509_svid`` looks bundles up in), and an async
iterator of updates. A source reading PEM files can satisfy it as well as :class:`X509Source`.

:class:`X509Source` follows any watch of X.509 contexts, typically
``WorkloadAPIClient.watch_x509_context``; when the watch breaks it starts a new one after a
jittered exponential backoff (0.5 s doubling up to 30 s, each delay drawn between 0.5 s and that
bound), reset by every update received. This module imports neither gRPC nor the generated code,
so the proxy may import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Protocol, Self

from sidecar.workload.identities import X509Context
from spiffecore import X509SVID, BundleSet, JWTBundle, SpiffeBundle, SpiffeError

MIN_BACKOFF: Final = 0.5
MAX_BACKOFF: Final = 30.0
DEFAULT_READY_TIMEOUT: Final = 30.0

_log = logging.getLogger(__name__)

WatchFactory = Callable[[], AsyncIterator[X509Context]]
"""Opens a new watch: an async iterator of X.509 contexts that raises :class:`SpiffeError` when it breaks."""


class X509SourceError(SpiffeError):
    """An X.509 source cannot answer: not ready yet, closed, or no SVID with the hint asked for."""

    layer = "x509source"


NOT_READY: Final = "no X.509 context received yet (await ready() first)"
CLOSED: Final = "the source is closed"
NO_SUCH_HINT: Final = "no X.509-SVID with this hint"
WATCH_ENDED: Final = "the watch ended"


class X509SourceProtocol(Protocol):
    """The X.509-SVIDs and bundles a TLS endpoint presents and verifies with, kept current."""

    def svid(self, hint: str | None = None) -> X509SVID:
        """The default SVID, or the one with ``hint``; :class:`X509SourceError` if there is none."""
        ...

    @property
    def bundles(self) -> BundleSet:
        """The X.509 bundles of every trust domain the SVIDs' holder may trust, own and federated."""
        ...

    def updates(self) -> AsyncIterator[X509Context]:
        """The current context at once (if any), then each new one; ends when the source closes."""
        ...


def bundle_set(context: X509Context) -> BundleSet:
    """The context's X.509 bundles, own and federated, as a :class:`BundleSet` (with no JWT keys)."""
    x509_bundles = {context.bundle.trust_domain: context.bundle, **context.federated}
    return BundleSet(
        {td: SpiffeBundle(x509=bundle, jwt=JWTBundle(trust_domain=td)) for td, bundle in x509_bundles.items()}
    )


def select_svid(context: X509Context, hint: str | None) -> X509SVID:
    """The default SVID (the first), or the first with ``hint``."""
    if hint is None:
        return context.svids[0]
    for svid in context.svids:
        if svid.hint == hint:
            return svid
    raise X509SourceError(NO_SUCH_HINT, hint)


@dataclass(slots=True)
class Backoff:
    """Jittered exponential backoff: the n-th delay (from 0) is drawn from [minimum, min(maximum, minimum * 2**n)]."""

    minimum: float = MIN_BACKOFF
    maximum: float = MAX_BACKOFF
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next(self) -> float:
        bound = min(self.maximum, self.minimum * 2.0 ** min(self.attempt, 64))
        self.attempt += 1
        return self.rng.uniform(self.minimum, bound)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True, slots=True)
class _Snapshot:
    context: X509Context
    bundles: BundleSet


class X509Source:
    """The latest X.509 context from a watch, reconnecting with backoff. Use ``async with``.

    ``svid()``, ``bundles`` and ``context`` read the latest context without waiting (they raise
    :class:`X509SourceError` before the first one); :meth:`ready` waits for it.
    """

    def __init__(self, watch: WatchFactory, *, backoff: Backoff | None = None) -> None:
        self._watch = watch
        self._backoff = backoff if backoff is not None else Backoff()
        self._snapshot: _Snapshot | None = None
        self._version = 0
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.last_error: SpiffeError | None = None
        """Why the watch last broke (``None`` once an update arrives again)."""

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def start(self) -> None:
        """Start following the watch (``async with`` does this)."""
        if self._closed:
            raise X509SourceError(CLOSED)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="x509-source")

    async def close(self) -> None:
        """Stop following the watch; pending :meth:`updates` iterators end."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._wake()

    async def ready(self, timeout: float | None = DEFAULT_READY_TIMEOUT) -> None:
        """Wait for the first X.509 context; :class:`X509SourceError` after ``timeout`` seconds."""
        if self._closed:
            raise X509SourceError(CLOSED)
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            reason = f" (last error: {self.last_error})" if self.last_error is not None else ""
            raise X509SourceError(f"no X.509 context within {timeout:g} s{reason}") from None
        if self._snapshot is None:
            raise X509SourceError(CLOSED)

    @property
    def context(self) -> X509Context:
        return self._current().context

    def svid(self, hint: str | None = None) -> X509SVID:
        return select_svid(self._current().context, hint)

    @property
    def bundles(self) -> BundleSet:
        return self._current().bundles

    async def updates(self) -> AsyncIterator[X509Context]:
        seen = 0
        while not self._closed:
            snapshot = self._snapshot
            if snapshot is not None and self._version > seen:
                seen = self._version
                yield snapshot.context
                continue
            await self._changed.wait()

    def _current(self) -> _Snapshot:
        if self._closed:
            raise X509SourceError(CLOSED)
        if self._snapshot is None:
            raise X509SourceError(NOT_READY)
        return self._snapshot

    def _publish(self, context: X509Context) -> None:
        self._snapshot = _Snapshot(context=context, bundles=bundle_set(context))
        self._version += 1
        self.last_error = None
        self._ready.set()
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self._closed:
            self._ready.set()

    async def _run(self) -> None:
        while True:
            try:
                async for context in self._watch():
                    self._publish(context)
                    self._backoff.reset()
                self.last_error = X509SourceError(WATCH_ENDED)
            except SpiffeError as err:
                self.last_error = err
            delay = self._backoff.next()
            _log.warning(
                "X.509 context watch broke; reconnecting",
                extra={"reason": str(self.last_error), "retry_in_seconds": round(delay, 3)},
            )
            await asyncio.sleep(delay)
