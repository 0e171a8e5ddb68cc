"""Helper mode's loop: keep the files current and tell the application, or write them once.

Three kinds of update, each in its own task:

- **X.509**: an :class:`~sidecar.workload.source.X509Source` follows the Workload API's X.509 watch
  (reconnecting with backoff). Every new context is rendered; if the bytes differ from the last
  written, every X.509 file is rewritten, then the application is told (pid file signal, command).
- **JWT-SVIDs**: one task per configured file fetches the token, writes it, and sleeps for half its
  remaining life; on errors it retries with backoff (1 s doubling to 60 s) and keeps the old file.
- **JWT bundles**: the Workload API's JWT bundle watch, reconnecting with backoff.

Workload API errors never remove a file: the last good one stays. A refusal (PermissionDenied:
no registration entry matches this process) is logged as such. Writes that fail (a full disk, a
read-only directory) are logged and retried with backoff.

One-shot mode (:meth:`Helper.run_once`) waits up to ``once_timeout`` for an X.509 context, every
JWT-SVID and the JWT bundles, writes everything, signals the pid file if configured, and returns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Final, TypeVar

import grpc

from sidecar.helper.config import HelperConfig, JWTSVIDFile
from sidecar.helper.files import OutputFile, X509Layout, jwt_bundle_file, jwt_svid_file, write_files, x509_files
from sidecar.helper.process import Command, signal_pid_file
from sidecar.workload.client import WorkloadAPIClient, WorkloadAPIError
from sidecar.workload.identities import X509Context
from sidecar.workload.source import Backoff, X509Source, X509SourceError, select_svid
from spiffecore import JWTSVID, JWTBundle, SpiffeError, TrustDomain
from spiffeops.lifecycle import wait_for_shutdown_signal
from spiffeops.status import StatusServer, parse_host_port

JWT_MIN_BACKOFF: Final = 1.0
JWT_MAX_BACKOFF: Final = 60.0
JWT_MIN_REFRESH: Final = 1.0
WRITE_MIN_BACKOFF: Final = 1.0
WRITE_MAX_BACKOFF: Final = 30.0

log = logging.getLogger("spiffe-agent.helper")

T = TypeVar("T")


class HelperError(SpiffeError):
    """Helper mode cannot do what it was asked: no SVID in time, an unusable cert dir, ..."""

    layer = "helper"


def _now() -> datetime:
    return datetime.now(UTC)


def explain(err: SpiffeError) -> str:
    """``err`` for a log line or an exit message, with the likely cause of a refusal."""
    if isinstance(err, WorkloadAPIError) and err.code == grpc.StatusCode.PERMISSION_DENIED:
        return (
            f"{err} (the Workload API has no identity for this process: is there a registration entry "
            f"whose selectors match it, such as unix:uid:{os.getuid()}?)"
        )
    return str(err)


def layout_of(config: HelperConfig) -> X509Layout:
    return X509Layout(
        svid_file_name=config.svid_file_name,
        svid_key_file_name=config.svid_key_file_name,
        svid_bundle_file_name=config.svid_bundle_file_name,
        combined_file_name=config.combined_file_name,
        include_federated_bundles=config.include_federated_bundles,
        cert_file_mode=config.cert_file_mode,
        key_file_mode=config.key_file_mode,
    )


class Helper:
    """Helper mode for one ``helper.yaml``. :meth:`run` until a shutdown signal, or :meth:`run_once`."""

    def __init__(self, config: HelperConfig, *, clock: Callable[[], datetime] = _now) -> None:
        self.config = config
        self.directory = config.cert_dir
        self._clock = clock
        self._layout = layout_of(config)
        self._written: dict[str, bytes] = {}
        self._x509_expiry: datetime | None = None
        self._jwt_expiry: dict[str, datetime] = {}
        self._jwt_bundle_written = False
        self._notify_lock = asyncio.Lock()
        self._last_error: SpiffeError | None = None
        self.command: Command | None = None
        if config.cmd is not None:
            self.command = Command(config.cmd, config.cmd_args, renew_signal=config.cmd_renew_signal)
        self.x509_updates = 0
        """How many times the X.509 files were (re)written."""
        self.status: StatusServer | None = None

    # --- readiness -------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """Ready once every file was written and neither the X.509-SVID nor a JWT-SVID expired."""
        now = self._clock()
        if self._x509_expiry is None:
            return False, "the X.509 files are not written yet"
        if self._x509_expiry <= now:
            return False, f"the X.509-SVID in the files expired at {self._x509_expiry.isoformat()}"
        for jwt in self.config.jwt_svids:
            expiry = self._jwt_expiry.get(jwt.file_name)
            if expiry is None:
                return False, f"{jwt.file_name} is not written yet"
            if expiry <= now:
                return False, f"the JWT-SVID in {jwt.file_name} expired at {expiry.isoformat()}"
        if self.config.jwt_bundle_file_name is not None and not self._jwt_bundle_written:
            return False, f"{self.config.jwt_bundle_file_name} is not written yet"
        return True, "files written"

    # --- the modes -------------------------------------------------------------------------------

    def _check_directory(self) -> None:
        if not self.directory.is_dir():
            raise HelperError("cert_dir is not a directory", str(self.directory))

    async def run_once(self) -> None:
        """Write every file once; :class:`HelperError` if that cannot be done within ``once_timeout``."""
        self._check_directory()
        timeout = self.config.once_timeout.total_seconds()
        async with WorkloadAPIClient(self.config.socket) as client:
            try:
                async with asyncio.timeout(timeout):
                    async with X509Source(self._watch(client)) as source:
                        await source.ready(timeout=None)
                        context = source.context
                    jwt_files = [await self._fetch_jwt_until(client, jwt) for jwt in self.config.jwt_svids]
                    bundle_files = []
                    if self.config.jwt_bundle_file_name is not None:
                        bundles = await self._retrying(client.fetch_jwt_bundles, "JWT bundles")
                        bundle_files.append(
                            jwt_bundle_file(bundles, self.config.jwt_bundle_file_name, mode=self.config.cert_file_mode)
                        )
            except TimeoutError:
                raise HelperError(f"no SVID within {timeout:g} s{self._last_error_text()}") from None
        self._write_x509(context)
        write_files(self.directory, [*jwt_files, *bundle_files])
        log.info("files written once", extra={"cert_dir": str(self.directory)})
        await self._notify_pid_file()

    async def run(self, *, announce: Callable[[str], None] = print, stop: asyncio.Event | None = None) -> None:
        """Keep the files current until SIGTERM/SIGINT (or ``stop``), then stop the command."""
        self._check_directory()
        config = self.config
        if config.health is not None:
            host, port = parse_host_port(config.health)
            self.status = StatusServer(host, port, readiness=self.readiness)
            self.status.start()
        received: signal.Signals = signal.SIGTERM
        try:
            async with WorkloadAPIClient(config.socket) as client, asyncio.TaskGroup() as tasks:
                workers = [tasks.create_task(self._follow_x509(client), name="helper-x509")]
                workers += [
                    tasks.create_task(self._follow_jwt(client, jwt), name=f"helper-jwt-{jwt.file_name}")
                    for jwt in config.jwt_svids
                ]
                if config.jwt_bundle_file_name is not None:
                    workers.append(tasks.create_task(self._follow_jwt_bundles(client), name="helper-jwt-bundles"))
                announce(f"spiffe-agent helper: writing to {self.directory} from {client.target}")
                if stop is None:
                    received = await wait_for_shutdown_signal()
                    log.info("shutting down", extra={"signal": received.name})
                else:
                    await stop.wait()
                for worker in workers:
                    worker.cancel()
        finally:
            if self.command is not None:
                async with self._notify_lock:
                    await self.command.stop(received)
            if self.status is not None:
                self.status.stop()

    # --- X.509 -----------------------------------------------------------------------------------

    def _last_error_text(self) -> str:
        return f" (last error: {explain(self._last_error)})" if self._last_error is not None else ""

    def _watch(self, client: WorkloadAPIClient) -> Callable[[], AsyncIterator[X509Context]]:
        """The source's watch factory, logging a refusal clearly before the source backs off."""

        async def watch() -> AsyncIterator[X509Context]:
            try:
                async for context in client.watch_x509_context():
                    yield context
            except SpiffeError as err:
                self._last_error = err
                if isinstance(err, WorkloadAPIError) and err.code == grpc.StatusCode.PERMISSION_DENIED:
                    log.error("no X.509-SVID for this process; files left as they are", extra={"reason": explain(err)})
                raise

        return watch

    def _write_x509(self, context: X509Context) -> bool:
        """Write the X.509 files if they changed; whether they were written. Raises ``OSError``."""
        if not context.svids:  # every entry's SVID is still being signed
            raise X509SourceError("the Workload API sent no X.509-SVID yet")
        svid = select_svid(context, self.config.hint)
        files = x509_files(svid, context, self._layout)
        if all(self._written.get(f.name) == f.data for f in files):
            return False
        write_files(self.directory, files)
        self._remember(files)
        self._x509_expiry = svid.expires_at
        self.x509_updates += 1
        log.info(
            "X.509 files written",
            extra={
                "spiffe_id": str(svid.id),
                "serial": f"{svid.leaf.serial_number:x}",
                "expires_at": svid.expires_at.isoformat(),
                "files": ", ".join(f.name for f in files),
            },
        )
        return True

    def _remember(self, files: tuple[OutputFile, ...] | list[OutputFile]) -> None:
        for output in files:
            self._written[output.name] = output.data

    async def _follow_x509(self, client: WorkloadAPIClient) -> None:
        backoff = Backoff(WRITE_MIN_BACKOFF, WRITE_MAX_BACKOFF)
        async with X509Source(self._watch(client)) as source:
            async for _ in source.updates():
                backoff.reset()
                while True:
                    context = source.context  # the newest, also when a retry waited
                    try:
                        changed = self._write_x509(context)
                    except X509SourceError as err:  # no SVID (with the configured hint)
                        log.error("cannot choose an X.509-SVID; files left as they are", extra={"reason": str(err)})
                        break
                    except OSError as err:
                        delay = backoff.next()
                        log.error(
                            "cannot write the X.509 files; retrying",
                            extra={"reason": f"{err.filename}: {err.strerror or err}", "retry_in_seconds": delay},
                        )
                        await asyncio.sleep(delay)
                        continue
                    if changed:
                        await self._notify()
                    break

    async def _notify(self) -> None:
        """Tell the application, after every file is written."""
        async with self._notify_lock:
            await self._notify_pid_file()
            if self.command is not None:
                await self.command.notify()

    async def _notify_pid_file(self) -> None:
        sig = self.config.pid_signal
        if self.config.pid_file is not None and sig is not None:
            await signal_pid_file(self.config.pid_file, sig)

    # --- JWT -------------------------------------------------------------------------------------

    async def _fetch_jwt(self, client: WorkloadAPIClient, jwt: JWTSVIDFile) -> JWTSVID:
        svids = await client.fetch_jwt_svids(jwt.audiences)
        hint = self.config.hint
        for svid in svids:
            if hint is None or svid.hint == hint:
                return svid
        raise HelperError("no JWT-SVID with this hint", hint)

    async def _retrying(self, fetch: Callable[[], Awaitable[T]], what: str) -> T:
        """``fetch()`` until it answers, with backoff (the caller bounds the time)."""
        backoff = Backoff(JWT_MIN_BACKOFF, JWT_MAX_BACKOFF)
        while True:
            try:
                return await fetch()
            except SpiffeError as err:
                self._last_error = err
                log.warning(f"cannot fetch {what} yet; retrying", extra={"reason": explain(err)})
                await asyncio.sleep(backoff.next())

    async def _fetch_jwt_until(self, client: WorkloadAPIClient, jwt: JWTSVIDFile) -> OutputFile:
        svid = await self._retrying(lambda: self._fetch_jwt(client, jwt), f"a JWT-SVID for {jwt.file_name}")
        self._jwt_expiry[jwt.file_name] = svid.expiry
        return jwt_svid_file(svid, jwt.file_name, mode=self.config.key_file_mode)

    def refresh_delay(self, svid: JWTSVID) -> float:
        """Half the token's remaining life, at least a second."""
        remaining = (svid.expiry - self._clock()).total_seconds()
        return max(JWT_MIN_REFRESH, remaining / 2)

    async def _follow_jwt(self, client: WorkloadAPIClient, jwt: JWTSVIDFile) -> None:
        backoff = Backoff(JWT_MIN_BACKOFF, JWT_MAX_BACKOFF)
        while True:
            try:
                svid = await self._fetch_jwt(client, jwt)
                output = jwt_svid_file(svid, jwt.file_name, mode=self.config.key_file_mode)
                write_files(self.directory, [output])
            except SpiffeError as err:
                delay = backoff.next()
                log.error(
                    "cannot fetch a JWT-SVID; the old file stays; retrying",
                    extra={"file": jwt.file_name, "reason": explain(err), "retry_in_seconds": round(delay, 3)},
                )
                await asyncio.sleep(delay)
                continue
            except OSError as err:
                delay = backoff.next()
                log.error(
                    "cannot write a JWT-SVID file; retrying",
                    extra={"file": jwt.file_name, "reason": err.strerror or str(err), "retry_in_seconds": delay},
                )
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self._remember([output])
            self._jwt_expiry[jwt.file_name] = svid.expiry
            delay = self.refresh_delay(svid)
            log.info(
                "JWT-SVID file written",
                extra={
                    "file": jwt.file_name,
                    "spiffe_id": str(svid.id),
                    "expires_at": svid.expiry.isoformat(),
                    "refresh_in_seconds": round(delay, 3),
                },
            )
            await asyncio.sleep(delay)

    async def _follow_jwt_bundles(self, client: WorkloadAPIClient) -> None:
        name = self.config.jwt_bundle_file_name
        assert name is not None
        backoff = Backoff()
        while True:
            try:
                async for bundles in client.watch_jwt_bundles():
                    backoff.reset()
                    self._write_jwt_bundles(bundles, name)
                raise WorkloadAPIError(grpc.StatusCode.UNAVAILABLE, "the JWT bundle watch ended")
            except (SpiffeError, OSError) as err:
                reason = explain(err) if isinstance(err, SpiffeError) else (err.strerror or str(err))
                delay = backoff.next()
                log.warning(
                    "JWT bundle watch broke; the old file stays; reconnecting",
                    extra={"reason": reason, "retry_in_seconds": round(delay, 3)},
                )
                await asyncio.sleep(delay)

    def _write_jwt_bundles(self, bundles: Mapping[TrustDomain, JWTBundle], name: str) -> None:
        output = jwt_bundle_file(bundles, name, mode=self.config.cert_file_mode)
        if self._written.get(name) == output.data:
            return
        write_files(self.directory, [output])
        self._remember([output])
        self._jwt_bundle_written = True
        log.info("JWT bundle file written", extra={"file": name, "trust_domains": ", ".join(td.name for td in bundles)})


async def run_helper(config: HelperConfig) -> None:
    """Run helper mode as ``config`` says (once, or until a shutdown signal)."""
    helper = Helper(config)
    if config.once:
        await helper.run_once()
    else:
        await helper.run()
