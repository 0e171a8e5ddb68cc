"""``--workers N``: N proxy processes accepting on one TCP port, under one parent.

One Python process relays on one core; the kernel spreads a port's new connections over the
sockets that listen on it with SO_REUSEPORT (by a hash of the addresses), so N processes use N
cores without sharing anything but the port (measured: 2 workers took 8-connection throughput
from 802 to 1054 MB/s, ARCHITECTURE.md).

The parent (:class:`Supervisor`) has checked the configuration before it starts anything, so a
mistake exits 2 with no process started. It binds the port itself with SO_REUSEPORT and never
listens on it: that reserves the port (the one chosen when ``:0`` was asked for) for the workers,
also across a worker's restart, and a port in use is an error before any worker starts. Then it
starts each worker as a new process of the same command (``sys.executable -m ...``, a hidden
``--worker`` flag: a fresh interpreter, no state inherited but the environment), each in a
session of its own so a terminal's Ctrl-C reaches the parent only and the workers hear it once,
forwarded. A worker is :class:`sidecar.proxy.app.ProxyApp` as it runs alone, listening with
SO_REUSEPORT on the reserved port; it prints its ready line on a pipe to the parent, and asks
the kernel for SIGTERM if the parent dies (so it drains rather than lingers).

The parent prints the one ready line once every worker is ready. It forwards SIGTERM, SIGINT and
SIGHUP to every worker; after a stop signal it waits for the workers' drains and exits 0 if each
exited 0, else 1. A worker that dies unexpectedly is logged with its exit code or signal,
counted (``spiffe_proxy_worker_restarts_total``) and started again (after 1 s, doubling to 30 s
while it keeps dying young); one that fails before the first ready line fails the start.

``--status`` is served by the parent: ``/readyz`` is ready when every worker is ready and the
upstream answers, ``/metrics`` adds up the workers' metrics through prometheus-client's
multiprocess mode (each worker writes its values to files in a private directory the parent
names in ``PROMETHEUS_MULTIPROC_DIR`` and removes at exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from sidecar.proxy.address import Address
from sidecar.proxy.app import ProxyConfig, UpstreamProbe, start_status
from spiffeops.status import StatusServer

__all__ = ["Supervisor", "WorkerFields", "die_with_parent", "worker_argv"]

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
READY_MARGIN: Final = 30.0
"""Seconds a worker may take to start beyond the identity timeout (an interpreter, its imports)."""
STOP_MARGIN: Final = 10.0
"""Seconds the parent waits beyond the drain timeout before it kills a worker that is still running."""
RESTART_DELAY: Final = 1.0
RESTART_DELAY_MAX: Final = 30.0
YOUNG: Final = 10.0
"""A worker that dies within this many seconds of its start doubles the delay of the next restart."""
_PR_SET_PDEATHSIG: Final = 1

_log = logging.getLogger("spiffe-proxy")


def worker_argv(command: Sequence[str], argv: Sequence[str], *, index: int, port: int, parent: int) -> list[str]:
    """The command line of worker ``index``: the parent's own flags, then the hidden worker flags."""
    return [*command, *argv, "--worker", str(index), "--worker-port", str(port), "--worker-parent", str(parent)]


def die_with_parent(parent: int) -> None:
    """Ask Linux for SIGTERM when the parent process dies, so a worker never outlives it."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        _log.warning("cannot follow the parent process", extra={"reason": os.strerror(ctypes.get_errno())})
    if os.getppid() != parent:  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


class WorkerFields(logging.Filter):
    """Adds ``worker`` (the index) and ``pid`` to every log record of a worker process."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.pid = os.getpid()

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        record.pid = self.pid
        return True


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    started_at: float = 0.0
    restarts: int = 0
    young_deaths: int = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class _StartFailedError(Exception):
    def __init__(self, worker: _Worker, code: int | None) -> None:
        super().__init__(worker.index, code)
        self.worker = worker
        self.code = code


class Supervisor:
    """The parent of ``config.workers`` worker processes; :meth:`run` returns the exit code.

    ``command`` starts this proxy's command line in a new interpreter (such as
    ``[sys.executable, "-m", "sidecar.proxy_cli"]``); ``argv`` is the parent's own flags, which
    each worker gets too.
    """

    def __init__(self, config: ProxyConfig, *, command: Sequence[str], argv: Sequence[str]) -> None:
        if config.workers < 2 or config.listen.is_unix:
            raise ValueError("a supervisor is for two or more workers on a TCP port")
        self.config = config
        self.command = tuple(command)
        self.argv = tuple(argv)
        self.workers = [_Worker(index) for index in range(config.workers)]
        self.registry = CollectorRegistry()
        self._restarts = Counter(
            "spiffe_proxy_worker_restarts",
            "Worker processes started again after they died unexpectedly.",
            registry=self.registry,
        )
        self._ready_gauge = Gauge("spiffe_proxy_workers_ready", "Worker processes ready now.", registry=self.registry)
        self._metrics_dir: str | None = None
        self._port = 0
        self._stopping = asyncio.Event()
        self._stop_signal: signal.Signals | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- the whole life ---------------------------------------------------------------------

    async def run(self, announce: Callable[[str], None]) -> int:
        config = self.config
        if config.files is not None:
            config.files.load()  # a bad file exits 2 here, before any worker starts
        loop = asyncio.get_running_loop()
        reserved = _reserve(config.listen)
        status: StatusServer | None = None
        try:
            self._port = reserved.getsockname()[1]
            if config.status is not None:
                self._metrics_dir = tempfile.mkdtemp(prefix="spiffe-proxy-metrics-")
                MultiProcessCollector(self.registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
                status = self._status()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, self._on_signal, sig)
            try:
                line = await self._start_all()
            except _StartFailedError as err:
                await self._stop_all(signal.SIGTERM)
                return _start_failure_code(err)
            if line is None:  # a stop signal came first
                return await self._stop_all(self._stop_signal or signal.SIGTERM)
            if status is not None:
                host, port = status.address
                line += f", status http://{Address(host=host, port=port)}"
            announce(f"{line}, {len(self.workers)} workers")
            _log.info(
                "workers ready",
                extra={"workers": len(self.workers), "pids": [w.pid for w in self.workers], "port": self._port},
            )
            for worker in self.workers:
                self._watch(worker)
            await self._stopping.wait()
            return await self._stop_all(self._stop_signal or signal.SIGTERM)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if status is not None:
                status.stop()
            reserved.close()
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
            _log.info("stopped")

    def _on_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            _log.info("SIGHUP: forwarded to the workers")
            self._forward(sig)
            return
        if self._stopping.is_set():
            _log.info("second stop signal: forwarded to the workers", extra={"signal": sig.name})
            self._forward(sig)
            return
        self._stop_signal = sig
        self._stopping.set()

    def _forward(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.running and worker.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    # --- starting -----------------------------------------------------------------------------

    async def _start_all(self) -> str | None:
        """Start every worker and wait for each ready line: the first one, or None if a stop
        signal came first. :class:`_StartFailedError` if a worker exits before it is ready."""
        starts = [asyncio.ensure_future(self._start(worker)) for worker in self.workers]
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            pending: set[asyncio.Future[Any]] = {*starts, stopped}
            while not all(start.done() for start in starts):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if stopped in done:
                    return None
                for future in done:
                    future.result()  # _StartFailedError
            return starts[0].result()
        finally:
            for future in (*starts, stopped):
                future.cancel()
            await asyncio.gather(*starts, stopped, return_exceptions=True)

    async def _start(self, worker: _Worker) -> str:
        """Start ``worker`` and return its ready line; :class:`_StartFailedError` if it exits first."""
        env = dict(os.environ)
        if self._metrics_dir is not None:
            env[MULTIPROC_ENV] = self._metrics_dir
        argv = worker_argv(self.command, self.argv, index=worker.index, port=self._port, parent=os.getpid())
        worker.ready = False
        worker.started_at = time.monotonic()
        worker.process = process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the parent, which forwards it once
        )
        assert process.stdout is not None
        if self._stopping.is_set():  # a stop signal came while it was being spawned
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(self._stop_signal or signal.SIGTERM)
        try:
            async with asyncio.timeout(self.config.identity_timeout + READY_MARGIN):
                line = await process.stdout.readline()
        except TimeoutError:
            _log.error("a worker did not become ready in time", extra={"worker": worker.index, "pid": process.pid})
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            line = b""
        if not line.endswith(b"\n"):
            code = await process.wait()
            self._reap(worker)
            raise _StartFailedError(worker, code)
        worker.ready = True
        self._ready_gauge.set(sum(w.ready for w in self.workers))
        return line.decode(errors="replace").rstrip("\n")

    # --- supervising ------------------------------------------------------------------------

    def _watch(self, worker: _Worker) -> None:
        task = asyncio.get_running_loop().create_task(self._supervise(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _supervise(self, worker: _Worker) -> None:
        """Wait for ``worker`` to exit; unless the parent is stopping, log it and start it again."""
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            worker.ready = False
            self._ready_gauge.set(sum(w.ready for w in self.workers))
            self._reap(worker)
            if self._stopping.is_set():
                return
            lived = time.monotonic() - worker.started_at
            worker.young_deaths = worker.young_deaths + 1 if lived < YOUNG else 0
            delay = min(RESTART_DELAY * 2 ** max(worker.young_deaths - 1, 0), RESTART_DELAY_MAX)
            _log.error(
                "a worker died; starting it again",
                extra={
                    "worker": worker.index,
                    "pid": worker.pid,
                    **_exit_fields(code),
                    "lived_seconds": round(lived, 3),
                    "restart_in_seconds": delay,
                },
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            worker.restarts += 1
            self._restarts.inc()
            try:
                await self._start(worker)
            except _StartFailedError as err:
                _log.error(
                    "a restarted worker failed before it was ready",
                    extra={"worker": worker.index, **_exit_fields(err.code)},
                )
                continue
            _log.info("worker restarted", extra={"worker": worker.index, "pid": worker.pid})

    def _reap(self, worker: _Worker) -> None:
        if self._metrics_dir is not None and worker.pid is not None:
            # Its live gauges leave the sums (prometheus-client has no annotations for this one).
            mark_process_dead(worker.pid, self._metrics_dir)  # type: ignore[no-untyped-call]

    # --- stopping -----------------------------------------------------------------------------

    async def _stop_all(self, sig: signal.Signals) -> int:
        """Forward ``sig``, wait for every worker's drain; 0 if each exited 0, else 1."""
        self._stopping.set()
        _log.info(
            "shutting down: the workers drain their connections",
            extra={"signal": sig.name, "drain_timeout": self.config.drain_timeout},
        )
        self._forward(sig)
        processes = [w.process for w in self.workers if w.process is not None]
        codes: list[int] = []
        try:
            async with asyncio.timeout(self.config.drain_timeout + STOP_MARGIN):
                codes = list(await asyncio.gather(*(p.wait() for p in processes)))
        except TimeoutError:
            for process in processes:
                if process.returncode is None:
                    _log.error("a worker did not stop after its drain: killed", extra={"pid": process.pid})
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            codes = list(await asyncio.gather(*(p.wait() for p in processes)))
            codes.append(1)
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode not in (0, None):
                _log.error(
                    "a worker did not exit cleanly",
                    extra={"worker": worker.index, "pid": worker.pid, **_exit_fields(worker.process.returncode)},
                )
            self._reap(worker)
        return 0 if all(code == 0 for code in codes) else 1

    # --- status -------------------------------------------------------------------------------

    def _status(self) -> StatusServer:
        assert self.config.status is not None
        probe = UpstreamProbe(self.config.upstream)

        def ready() -> tuple[bool, str]:
            problems = []
            waiting = sum(not (w.ready and w.running) for w in self.workers)
            if waiting:
                problems.append(f"{waiting} of {len(self.workers)} workers not ready")
            if not probe():
                problems.append("the upstream is unreachable")
            if problems:
                return False, "not ready: " + "; ".join(problems)
            return True, "ready"

        return start_status(self.config.status, ready, self.registry)


def _reserve(listen: Address) -> socket.socket:
    """A socket bound to ``listen`` with SO_REUSEPORT, never listening: the workers' port."""
    family, kind, proto, _, address = socket.getaddrinfo(
        listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _exit_fields(code: int | None) -> dict[str, object]:
    if code is None:
        return {}
    if code < 0:
        try:
            return {"signal": signal.Signals(-code).name}
        except ValueError:
            return {"signal": -code}
    return {"exit_code": code}


def _start_failure_code(err: _StartFailedError) -> int:
    _log.error(
        "a worker failed to start; stopping the others",
        extra={"worker": err.worker.index, "pid": err.worker.pid, **_exit_fields(err.code)},
    )
    return err.code if err.code in (1, 2) else 1
