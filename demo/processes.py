"""The demo's child processes: started in their own session, logged to files, stopped in reverse order.

Every child runs in a new session, so a Ctrl-C at the terminal reaches the demo alone, which then
stops the children itself: the last started first, each with SIGTERM and a wait for its exit
(SIGKILL after :data:`STOP_TIMEOUT`). Each child also asks the kernel for SIGTERM should the demo
die without stopping it (``PR_SET_PDEATHSIG``), so not even a killed demo leaves processes behind.
Every child carries ``SPIFFE_DEMO_RUN=<work directory>`` in its environment, which is how a test
finds any that outlived the demo.

Long-running children write stdout and stderr to files in the work directory; :meth:`Child.tail`
gives the last lines of either for a failure message. Short commands (the admin CLI) run to
completion with :meth:`Supervisor.run`, which raises :class:`DemoError` with their stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

STOP_TIMEOUT: Final = 10.0
COMMAND_TIMEOUT: Final = 30.0
TAIL_LINES: Final = 12
RUN_MARKER: Final = "SPIFFE_DEMO_RUN"
_PR_SET_PDEATHSIG: Final = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: a forked child only calls it


def _die_with_parent() -> None:
    """Run in the child between fork and exec: SIGTERM for it when the demo's thread goes away."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class DemoError(Exception):
    """A step failed: the message says what, ``children`` are the processes whose logs explain why."""

    def __init__(self, message: str, *children: Child) -> None:
        super().__init__(message)
        self.children = children


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


@dataclass
class Child:
    """A long-running process of the demo."""

    name: str
    process: asyncio.subprocess.Process
    stdout_path: Path
    stderr_path: Path
    expected_exit: bool = False
    exited: asyncio.Task[int] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The last lines of stderr (Envoy writes everything there), else of stdout."""
        return _tail(self.stderr_path, lines) or _tail(self.stdout_path, lines)

    async def first_line(self, *, timeout: float, what: str) -> str:
        """The first line the child printed on stdout (its ready line), waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
            if "\n" in text:
                return text.partition("\n")[0]
            if self.process.returncode is not None:
                raise DemoError(f"{self.name} exited with code {self.process.returncode} before {what}", self)
            if time.monotonic() > deadline:
                raise DemoError(f"{self.name} did not report {what} within {timeout:.0f} s", self)
            await asyncio.sleep(0.02)


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    stdout: str
    stderr: str


class Supervisor:
    """Starts the demo's processes, notices one that dies, and stops them all in reverse order."""

    def __init__(self, workdir: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.env = {**(os.environ if env is None else env), RUN_MARKER: str(workdir)}
        self.children: list[Child] = []
        self._crashed: asyncio.Future[Child] | None = None

    async def start(self, name: str, argv: Sequence[str | Path], *, log_name: str, cwd: Path | None = None) -> Child:
        """Start ``argv`` with stdout in ``logs/<log_name>.out`` and stderr in ``logs/<log_name>.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        stdout_path = self.logs / f"{log_name}.out"
        stderr_path = self.logs / f"{log_name}.log"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            try:
                process = await asyncio.create_subprocess_exec(
                    *(str(arg) for arg in argv),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    env=self.env,
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as err:
                raise DemoError(f"cannot start {name} ({argv[0]}): {err.strerror or err}") from err
        child = Child(name=name, process=process, stdout_path=stdout_path, stderr_path=stderr_path)
        child.exited = asyncio.create_task(self._watch(child))
        self.children.append(child)
        return child

    async def _watch(self, child: Child) -> int:
        code = await child.process.wait()
        if not child.expected_exit and self._crashed is not None and not self._crashed.done():
            self._crashed.set_result(child)
        return code

    async def crashed(self) -> Child:
        """The first child that exits without being asked to (waits for ever if none does)."""
        if self._crashed is None:
            self._crashed = asyncio.get_running_loop().create_future()
        return await self._crashed

    async def run(self, argv: Sequence[str | Path], *, what: str, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
        """Run a short command to completion; :class:`DemoError` naming ``what`` if it fails."""
        command = tuple(str(arg) for arg in argv)
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as err:
            raise DemoError(f"cannot {what}: cannot start {command[0]}: {err.strerror or err}") from err
        try:
            async with asyncio.timeout(timeout):
                out, errors = await process.communicate()
        except TimeoutError:
            raise DemoError(f"cannot {what}: {Path(command[0]).name} did not finish within {timeout:.0f} s") from None
        finally:
            if process.returncode is None:  # timed out, or the demo is being stopped
                process.kill()
                await process.wait()
        stdout, stderr = out.decode(errors="replace"), errors.decode(errors="replace")
        if process.returncode != 0:
            last = "\n".join(stderr.strip().splitlines()[-TAIL_LINES:]) or stdout.strip()
            raise DemoError(
                f"cannot {what}: {Path(command[0]).name} {command[1] if len(command) > 1 else ''} "
                f"exited with code {process.returncode}:\n{last}"
            )
        return CommandResult(command, stdout, stderr)

    async def stop_all(self, report: Callable[[str], None]) -> bool:
        """Stop every child, last started first; ``report`` gets a line for each.

        True if each exited 0 or by the SIGTERM itself, promptly, and none had died before.
        """
        clean = True
        for child in reversed(self.children):
            child.expected_exit = True
            if child.process.returncode is not None:
                report(f"{child.name} (pid {child.pid}) had already exited with code {child.process.returncode}")
                clean = False
                continue
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    code = await child.process.wait()
            except TimeoutError:
                child.process.kill()
                await child.process.wait()
                report(f"{child.name} did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM: killed")
                clean = False
                continue
            took = time.monotonic() - started
            if code in (0, -signal.SIGTERM):  # -SIGTERM: it was still starting, before its handler was set
                report(f"stopped {child.name} (pid {child.pid}, {took * 1000:.0f} ms)")
            else:
                report(f"{child.name} (pid {child.pid}) exited with code {code} after SIGTERM")
                clean = False
        for child in self.children:
            if child.exited is not None:
                await child.exited
        self.children.clear()
        return clean
