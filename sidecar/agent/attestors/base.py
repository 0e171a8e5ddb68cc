"""The caller of the agent's socket, and the interface every workload attestor implements.

Also the one reader of a process's start time (field 22 of ``/proc/<pid>/stat``), which both the
front door (when it accepts a connection) and the attestors (after reading a process's
attributes) use, so a PID reused by another process is never mistaken for the caller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from spiffecore import SpiffeError

PROC_ROOT: Final = Path("/proc")

# Fields of /proc/<pid>/stat after the ")" closing the command name: field 3 (state) is the first,
# field 22 (starttime) the twentieth. See proc(5).
_STATE_INDEX: Final = 0
_START_TIME_INDEX: Final = 19
_EXITED_STATES: Final = frozenset({"Z", "X", "x"})  # zombie, dead: the caller has exited


class WorkloadAttestationError(SpiffeError):
    """The calling process could not be attested (it exited, or its PID was reused meanwhile)."""

    layer = "workload"


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """A process connected to the agent's socket, as the kernel reported it (SO_PEERCRED).

    ``uid`` and ``gid`` are the process's effective ids when it connected: they are the ones
    attestors must use (not what ``/proc`` says later; a process may change ids after connecting).
    ``start_time`` is the process's start time in clock ticks since boot (field 22 of
    ``/proc/<pid>/stat``), read when the connection was accepted: an attestor checks it again
    after reading the process's attributes, so a PID reused by another process is never
    mistaken for the caller.
    """

    pid: int
    uid: int
    gid: int
    start_time: int

    def __post_init__(self) -> None:
        if self.pid <= 0:
            raise ValueError(f"caller pid must be positive, not {self.pid}")
        if self.uid < 0 or self.gid < 0 or self.start_time < 0:
            raise ValueError(f"caller ids and start time must not be negative: {self!r}")


class WorkloadAttestor(Protocol):
    """Selectors (``type:value`` strings such as ``unix:uid:1000``) for a caller."""

    @property
    def name(self) -> str: ...

    async def attest(self, caller: Caller) -> frozenset[str]:
        """The caller's selectors, or :class:`WorkloadAttestationError`."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessStat:
    """The two fields of ``/proc/<pid>/stat`` attestation needs."""

    state: str
    start_time: int

    @property
    def exited(self) -> bool:
        """A zombie (or dead) process: its PID is still taken, but the caller is gone."""
        return self.state in _EXITED_STATES


def parse_stat(data: bytes) -> ProcessStat:
    """Parse ``/proc/<pid>/stat``; ``ValueError`` if it is malformed.

    Field 2 is the command name in parentheses and may itself contain spaces, parentheses and
    newlines (any process may name itself ``a) b (c``), so the fields are counted from the *last*
    ``)``; the kernel writes nothing after it that could contain one.
    """
    begin = data.find(b"(")
    end = data.rfind(b")")
    if begin < 0 or end < begin:
        raise ValueError("no command name in parentheses")
    fields = data[end + 1 :].split()
    if len(fields) <= _START_TIME_INDEX:
        raise ValueError(f"{len(fields) + 2} fields, want at least {_START_TIME_INDEX + 3}")
    state = fields[_STATE_INDEX]
    start = fields[_START_TIME_INDEX]
    if len(state) != 1 or not state.isalpha():
        raise ValueError(f"process state {state!r} is not one letter")
    if not start.isdigit():
        raise ValueError(f"start time {start!r} is not a number")
    return ProcessStat(state=state.decode(), start_time=int(start))


def read_stat(pid: int, *, proc_root: Path = PROC_ROOT, dir_fd: int | None = None) -> ProcessStat:
    """``/proc/<pid>/stat`` of a live process, or :class:`WorkloadAttestationError`.

    With ``dir_fd`` (an open ``/proc/<pid>`` directory) the file is read relative to it: once that
    process has exited, reads through it fail instead of reaching a process that reused the PID.
    A process that has exited (including a zombie) is an error: the caller is gone.
    """
    try:
        if dir_fd is None:
            data = (proc_root / str(pid) / "stat").read_bytes()
        else:
            fd = os.open("stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                data = os.read(fd, 4096)
            finally:
                os.close(fd)
    except (FileNotFoundError, ProcessLookupError) as err:
        raise WorkloadAttestationError(f"process {pid} has exited") from err
    except OSError as err:
        raise WorkloadAttestationError(f"cannot read the stat of process {pid}: {err.strerror}") from err
    try:
        stat = parse_stat(data)
    except ValueError as err:
        raise WorkloadAttestationError(f"malformed stat of process {pid}: {err}") from err
    if stat.exited:
        raise WorkloadAttestationError(f"process {pid} has exited")
    return stat


_READ_SIZE: Final = 16 * 1024


def read_proc_file(pid: int, name: str, dir_fd: int, *, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``/proc/<pid>/<name>``, read through the open ``/proc/<pid>``
    directory ``dir_fd`` (so a PID reused since cannot answer), or :class:`WorkloadAttestationError`.

    Plain reads into a small buffer: a buffered ``file.read(limit)`` would allocate the whole limit.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except (FileNotFoundError, ProcessLookupError) as err:
        raise WorkloadAttestationError(f"process {pid} has exited") from err
    except OSError as err:
        raise WorkloadAttestationError(f"cannot read the {name} of process {pid}: {err.strerror}") from err
    try:
        chunks: list[bytes] = []
        size = 0
        while size < limit and (chunk := os.read(fd, min(_READ_SIZE, limit - size))):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except ProcessLookupError as err:
        raise WorkloadAttestationError(f"process {pid} has exited") from err
    except OSError as err:
        raise WorkloadAttestationError(f"cannot read the {name} of process {pid}: {err.strerror}") from err
    finally:
        os.close(fd)
