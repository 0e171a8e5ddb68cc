"""Telling the application that its files changed: a signal to a pid file's process, or a command.

:func:`signal_pid_file` re-reads the pid file every time (the application may have restarted) and
retries briefly, since an application that is starting may not have written it yet.

:class:`Command` runs the application itself: started after the first write; on each later update
sent ``renew_signal`` if one is set, else restarted (SIGTERM, then SIGKILL after a grace period).
If it exits on its own, that is logged and it starts again on the next update, as with
spiffe-helper: the helper is not a supervisor that restarts in a loop. On shutdown the helper
forwards the signal it received (SIGTERM or SIGINT) and waits for the command to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Final

DEFAULT_GRACE: Final = 10.0
PID_FILE_ATTEMPTS: Final = 5
PID_FILE_FIRST_DELAY: Final = 0.1

_log = logging.getLogger("spiffe-agent.helper")


class PidFileError(Exception):
    """The pid file names no process this helper can signal; the message says why."""


def read_pid(path: Path) -> int:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError as err:
        raise PidFileError(f"pid file {str(path)!r} does not exist") from err
    except OSError as err:
        raise PidFileError(f"cannot read pid file {str(path)!r}: {err.strerror or err}") from err
    if not text.isdigit() or int(text) <= 0:
        raise PidFileError(f"pid file {str(path)!r} does not hold a process id: {text[:40]!r}")
    return int(text)


def signal_pid(path: Path, sig: signal.Signals) -> int:
    """Send ``sig`` to the process in ``path`` once; its pid, or :class:`PidFileError`."""
    pid = read_pid(path)
    try:
        os.kill(pid, sig)
    except ProcessLookupError as err:
        raise PidFileError(f"no process {pid} (from pid file {str(path)!r})") from err
    except PermissionError as err:
        raise PidFileError(f"not allowed to signal process {pid} (from pid file {str(path)!r})") from err
    return pid


async def signal_pid_file(
    path: Path, sig: signal.Signals, *, attempts: int = PID_FILE_ATTEMPTS, first_delay: float = PID_FILE_FIRST_DELAY
) -> bool:
    """Signal the pid file's process, retrying with doubling delays; whether it was signalled."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            pid = signal_pid(path, sig)
        except PidFileError as err:
            if attempt == attempts:
                _log.error(
                    "cannot signal the pid file's process; giving up until the next update",
                    extra={"reason": str(err), "attempts": attempts},
                )
                return False
            _log.warning("cannot signal the pid file's process yet; retrying", extra={"reason": str(err)})
            await asyncio.sleep(delay)
            delay *= 2
        else:
            _log.info("signalled the pid file's process", extra={"pid": pid, "signal": sig.name})
            return True
    return False


class Command:
    """The application run by the helper. Not started until :meth:`notify` is first called."""

    def __init__(
        self,
        program: str,
        args: Sequence[str] = (),
        *,
        renew_signal: signal.Signals | None = None,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        self.program = program
        self.args = tuple(args)
        self.renew_signal = renew_signal
        self.grace = grace
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._reaper: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def notify(self) -> None:
        """The files changed: start the command, signal it, or restart it."""
        if self._stopping:
            return
        if not self.running:
            await self._start()
        elif self.renew_signal is not None:
            assert self.process is not None
            self.process.send_signal(self.renew_signal)
            _log.info("signalled the command", extra={"pid": self.process.pid, "signal": self.renew_signal.name})
        else:
            _log.info("restarting the command to load the new files", extra={"cmd": self.program})
            await self._terminate(signal.SIGTERM)
            await self._start()

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Forward ``sig``, wait up to the grace period (then SIGKILL); the exit code, if it ran."""
        self._stopping = True
        return await self._terminate(sig)

    async def _start(self) -> None:
        try:
            process = await asyncio.create_subprocess_exec(self.program, *self.args)
        except OSError as err:
            # A missing or non-executable program: say so; the next update tries again.
            _log.error("cannot start the command", extra={"cmd": self.program, "reason": err.strerror or str(err)})
            return
        self.process = process
        self.starts += 1
        _log.info("started the command", extra={"cmd": self.program, "pid": process.pid})
        self._reaper = asyncio.create_task(self._reap(process), name="helper-cmd-reaper")

    async def _reap(self, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if not self._stopping and self.process is process:
            _log.warning(
                "the command exited on its own; it starts again on the next update",
                extra={"cmd": self.program, "pid": process.pid, "exit_code": code},
            )

    async def _terminate(self, sig: signal.Signals) -> int | None:
        process, reaper = self.process, self.reaper_task
        if process is None:
            return None
        self.process = None  # whatever the reaper sees now is an exit the helper asked for
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            try:
                async with asyncio.timeout(self.grace):
                    await process.wait()
            except TimeoutError:
                _log.warning(
                    "the command did not exit within the grace period; killing it",
                    extra={"pid": process.pid, "grace_seconds": self.grace},
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if reaper is not None:
            await reaper
        _log.info("the command exited", extra={"pid": process.pid, "exit_code": process.returncode})
        return process.returncode

    @property
    def reaper_task(self) -> asyncio.Task[None] | None:
        return self._reaper
