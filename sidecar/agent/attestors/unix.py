"""The ``unix`` workload attestor: SPIRE's unix selectors for a caller of the agent's socket.

Selectors, as SPIRE's unix plugin makes them:

- ``unix:uid:<n>``, ``unix:gid:<n>``: the ids the kernel reported for the connection
  (SO_PEERCRED: the effective ids when the process connected). ``/proc`` is not asked: a
  process may change its ids after connecting, and the connection is what is being attested.
- ``unix:user:<name>``, ``unix:group:<name>``: those ids' names, when they resolve.
- ``unix:supplementary_gid:<n>`` and, when it resolves, ``unix:supplementary_group:<name>``
  for each group on the ``Groups:`` line of ``/proc/<pid>/status``.
- With ``discover_workload_path``: ``unix:path:<path>``, the target of ``/proc/<pid>/exe``,
  and ``unix:sha256:<hex>``, the digest of that executable (read through ``/proc/<pid>/exe``, so
  it is the file the process runs even in another mount namespace or after it was replaced).

Every file is read through one open ``/proc/<pid>`` directory, so once the process has exited
no read can reach another process that took its PID; the start time is compared with the one
read when the connection was accepted, before and after everything else, so a caller that exited
or whose PID was reused is an error, never another process's selectors.

The work is blocking (``/proc`` reads, user and group lookups that may ask NSS, hashing), so
:meth:`UnixAttestor.attest` runs it in a thread.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sidecar.agent.attestors.base import PROC_ROOT, Caller, WorkloadAttestationError, read_stat

log = logging.getLogger(__name__)

PLUGIN_NAME: Final = "unix"
_STATUS_LIMIT: Final = 1 << 20  # /proc/<pid>/status is ~1.5 KiB, but 65,536 supplementary groups take ~450 KiB
_GROUPS_PREFIX: Final = b"Groups:"


@dataclass(frozen=True, slots=True, kw_only=True)
class UnixAttestorConfig:
    """The unix attestor's options, named as SPIRE names them.

    ``workload_size_limit`` bounds the executables hashed for ``unix:sha256``, in bytes: ``0``
    means no limit, a negative value means never hash. Unlike SPIRE (which fails the attestation),
    an executable over the limit gets no ``unix:sha256`` selector and a logged warning.
    """

    discover_workload_path: bool = False
    workload_size_limit: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.discover_workload_path, bool):
            raise TypeError(f"discover_workload_path must be a bool, not {self.discover_workload_path!r}")
        if isinstance(self.workload_size_limit, bool) or not isinstance(self.workload_size_limit, int):
            raise TypeError(f"workload_size_limit must be an integer, not {self.workload_size_limit!r}")


def parse_groups(status: bytes) -> tuple[int, ...]:
    """The supplementary group ids on the ``Groups:`` line of ``/proc/<pid>/status``.

    ``ValueError`` if the line is missing or holds anything but decimal ids: the kernel always
    writes it (empty for a process with no supplementary groups).
    """
    for line in status.split(b"\n"):
        if line.startswith(_GROUPS_PREFIX):
            fields = line[len(_GROUPS_PREFIX) :].split()
            bad = [field for field in fields if not field.isdigit()]
            if bad:
                raise ValueError(f"group id {bad[0]!r} is not a number")
            return tuple(int(field) for field in fields)
    raise ValueError("no Groups line")


class UnixAttestor:
    """The ``unix`` workload attestor (see the module's documentation for its selectors)."""

    def __init__(self, config: UnixAttestorConfig | None = None, *, proc_root: Path = PROC_ROOT) -> None:
        self._config = config if config is not None else UnixAttestorConfig()
        self._proc_root = proc_root

    @property
    def name(self) -> str:
        return PLUGIN_NAME

    @property
    def config(self) -> UnixAttestorConfig:
        return self._config

    async def attest(self, caller: Caller) -> frozenset[str]:
        """The caller's selectors, or :class:`WorkloadAttestationError`; runs in a worker thread."""
        return await asyncio.to_thread(self.attest_blocking, caller)

    def attest_blocking(self, caller: Caller) -> frozenset[str]:
        """:meth:`attest` on the calling thread (it blocks on ``/proc``, NSS and hashing)."""
        pid = caller.pid
        try:
            dir_fd = os.open(self._proc_root / str(pid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as err:
            raise WorkloadAttestationError(f"process {pid} has exited") from err
        except OSError as err:
            raise WorkloadAttestationError(f"cannot open the /proc directory of process {pid}: {err.strerror}") from err
        try:
            # Checked first so a reused PID is reported before its binary is read, and last
            # (below) because that check is the one that covers everything read in between.
            self._check_same_process(caller, dir_fd)
            selectors = {f"unix:uid:{caller.uid}", f"unix:gid:{caller.gid}"}
            user = _user_name(caller.uid)
            if user is not None:
                selectors.add(f"unix:user:{user}")
            group = _group_name(caller.gid)
            if group is not None:
                selectors.add(f"unix:group:{group}")
            for gid in self._supplementary_groups(pid, dir_fd):
                selectors.add(f"unix:supplementary_gid:{gid}")
                name = _group_name(gid)
                if name is not None:
                    selectors.add(f"unix:supplementary_group:{name}")
            if self._config.discover_workload_path:
                selectors.add(f"unix:path:{self._executable_path(pid, dir_fd)}")
                digest = self._executable_sha256(pid, dir_fd)
                if digest is not None:
                    selectors.add(f"unix:sha256:{digest}")
            self._check_same_process(caller, dir_fd)
        finally:
            os.close(dir_fd)
        return frozenset(selectors)

    def _check_same_process(self, caller: Caller, dir_fd: int) -> None:
        stat = read_stat(caller.pid, dir_fd=dir_fd)
        if stat.start_time != caller.start_time:
            raise WorkloadAttestationError(
                f"process {caller.pid} is not the caller: it started at tick {stat.start_time}, "
                f"the caller at tick {caller.start_time} (the caller exited and its pid was reused)"
            )

    def _supplementary_groups(self, pid: int, dir_fd: int) -> tuple[int, ...]:
        status = _read_proc_file(pid, "status", dir_fd)
        try:
            return parse_groups(status)
        except ValueError as err:
            raise WorkloadAttestationError(f"malformed status of process {pid}: {err}") from err

    def _executable_path(self, pid: int, dir_fd: int) -> str:
        try:
            return os.readlink("exe", dir_fd=dir_fd)
        except (FileNotFoundError, ProcessLookupError) as err:
            raise WorkloadAttestationError(f"process {pid} has exited or has no executable") from err
        except OSError as err:
            raise WorkloadAttestationError(f"cannot read the executable path of process {pid}: {err.strerror}") from err

    def _executable_sha256(self, pid: int, dir_fd: int) -> str | None:
        limit = self._config.workload_size_limit
        if limit < 0:
            return None
        try:
            fd = os.open("exe", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        except (FileNotFoundError, ProcessLookupError) as err:
            raise WorkloadAttestationError(f"process {pid} has exited or has no executable") from err
        except OSError as err:
            raise WorkloadAttestationError(f"cannot open the executable of process {pid}: {err.strerror}") from err
        with os.fdopen(fd, "rb") as executable:
            size = os.fstat(fd).st_size
            if limit and size > limit:
                log.warning(
                    "unix attestor: executable not hashed: its size exceeds workload_size_limit",
                    extra={"pid": pid, "size": size, "workload_size_limit": limit},
                )
                return None
            return hashlib.file_digest(executable, "sha256").hexdigest()


def _read_proc_file(pid: int, name: str, dir_fd: int) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except (FileNotFoundError, ProcessLookupError) as err:
        raise WorkloadAttestationError(f"process {pid} has exited") from err
    except OSError as err:
        raise WorkloadAttestationError(f"cannot read the {name} of process {pid}: {err.strerror}") from err
    try:
        with os.fdopen(fd, "rb") as file:
            return file.read(_STATUS_LIMIT)
    except ProcessLookupError as err:
        raise WorkloadAttestationError(f"process {pid} has exited") from err


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None
