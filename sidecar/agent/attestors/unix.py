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

Nothing about a process is cached: every call reads its ``/proc`` anew. Two caches keyed by
things other than the process save the costly parts: user and group names by numeric id
(:class:`NameCache`, 30 s, as nscd does) and executables' digests by file identity
(:class:`DigestCache`). Their rules are stated on each.

Where the work runs: reading ``/proc/<pid>/stat`` and ``status`` takes microseconds and never
waits for another process or a file system, so a call whose names are all cached (and that hashes
nothing) runs on the event loop. A call that must ask NSS (which may reach a directory server) or
open the executable (which may live on a FUSE or network file system that stalls) runs in a
worker thread instead.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import logging
import os
import pwd
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeAlias

from sidecar.agent.attestors.base import PROC_ROOT, Caller, WorkloadAttestationError, read_proc_file, read_stat

log = logging.getLogger(__name__)

PLUGIN_NAME: Final = "unix"
NAME_TTL: Final = 30.0
NAME_CACHE_SIZE: Final = 4096
DIGEST_CACHE_SIZE: Final = 1024
DIGEST_SETTLE: Final = 2.0
_STATUS_LIMIT: Final = 1 << 20  # /proc/<pid>/status is ~1.5 KiB, but 65,536 supplementary groups take ~450 KiB
_GROUPS_PREFIX: Final = b"Groups:"

FileKey: TypeAlias = tuple[int, int, int, int, int]
"""An open file's identity: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)."""


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


class NameCache:
    """The names of user (or group) ids, each answer kept for ``ttl`` seconds, as nscd keeps them.

    Cache rule: the key is a numeric id and the value is what ``lookup`` (NSS) calls it, ``None``
    for "no such id". Nothing of a process or a connection is kept: the ids looked up come, on
    every call, from the connection being attested (SO_PEERCRED) or its ``/proc``. An answer is
    used for at most ``ttl`` seconds of ``clock``, so a user or group renamed or removed is seen
    within that time. At most ``max_size`` ids are kept; the oldest answer goes first.
    Thread-safe: the event loop and worker threads share one cache.
    """

    def __init__(
        self,
        lookup: Callable[[int], str | None],
        *,
        ttl: float = NAME_TTL,
        max_size: int = NAME_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0:
            raise ValueError(f"ttl must not be negative, not {ttl}")
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, not {max_size}")
        self._lookup = lookup
        self._ttl = ttl
        self._max_size = max_size
        self._clock = clock
        self._names: dict[int, tuple[float, str | None]] = {}  # id -> (expiry, name), oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._names)

    def cached(self, key: int) -> str | None:
        """The name of ``key`` if a fresh answer is held; ``KeyError`` if not (never blocks)."""
        expiry, name = self._names[key]
        if self._clock() >= expiry:
            raise KeyError(key)
        return name

    def get(self, key: int) -> str | None:
        """The name of ``key``: a fresh answer held, else ``lookup``'s (which may block)."""
        try:
            return self.cached(key)
        except KeyError:
            pass
        name = self._lookup(key)
        expiry = self._clock() + self._ttl
        with self._lock:
            self._names.pop(key, None)  # re-inserted last: the dict stays ordered by expiry
            while len(self._names) >= self._max_size:
                del self._names[next(iter(self._names))]
            self._names[key] = (expiry, name)
        return name


class DigestCache:
    """sha256 digests of executables, by the identity of the open file they were read from.

    Cache rule: the key is (device, inode, size, mtime, ctime) of the file, taken with ``fstat``
    on the descriptor that is hashed, before and after hashing; a digest is kept only when both
    agree and the file's ctime was at least ``settle`` seconds older than ``wall_clock`` when
    hashing began. Writing to a file, renaming it over or re-timing it sets its ctime to the
    current time, which users cannot set back, and a new file can only reuse an inode after the
    process hashed through it (which held the inode) has gone, so its ctime is later still: a
    changed file never matches a kept key. Nothing of a process is kept; the file is found anew
    through ``/proc/<pid>/exe`` on every call. A FUSE or network file system reports whatever
    identity its server chooses; such a server can also show exec and this read different bytes,
    so ``unix:sha256`` is no stronger than that file system with or without this cache. At most
    ``max_size`` digests are kept; the oldest goes first. Thread-safe.
    """

    def __init__(
        self,
        *,
        max_size: int = DIGEST_CACHE_SIZE,
        settle: float = DIGEST_SETTLE,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, not {max_size}")
        self._max_size = max_size
        self._settle_ns = int(settle * 1e9)
        self._wall_clock = wall_clock
        self._digests: dict[FileKey, str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._digests)

    def digest(self, fd: int) -> str:
        """The sha256 (hex) of the open regular file ``fd``, from the cache when its identity matches."""
        before = os.fstat(fd)
        key = file_key(before)
        cached = self._digests.get(key)
        if cached is not None:
            return cached
        started_ns = int(self._wall_clock() * 1e9)
        digest = hashlib.sha256()
        offset = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            digest.update(chunk)
            offset += len(chunk)
        hexdigest = digest.hexdigest()
        if file_key(os.fstat(fd)) == key and before.st_ctime_ns <= started_ns - self._settle_ns:
            with self._lock:
                while len(self._digests) >= self._max_size:
                    del self._digests[next(iter(self._digests))]
                self._digests[key] = hexdigest
        return hexdigest


def file_key(info: os.stat_result) -> FileKey:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class _WouldBlock(Exception):  # noqa: N818 - a signal inside this module, never raised out of it
    """Attestation on the event loop needs something that may block: run it in a thread."""


class UnixAttestor:
    """The ``unix`` workload attestor (see the module's documentation for its selectors).

    ``users``, ``groups`` and ``digests`` are the caches (made with their defaults when not given).
    """

    def __init__(
        self,
        config: UnixAttestorConfig | None = None,
        *,
        proc_root: Path = PROC_ROOT,
        users: NameCache | None = None,
        groups: NameCache | None = None,
        digests: DigestCache | None = None,
    ) -> None:
        self._config = config if config is not None else UnixAttestorConfig()
        self._proc_root = proc_root
        self._users = users if users is not None else NameCache(_user_name)
        self._groups = groups if groups is not None else NameCache(_group_name)
        self._digests = digests if digests is not None else DigestCache()
        # Opening the executable may stall (FUSE, NFS): never on the event loop.
        self._inline = not (self._config.discover_workload_path and self._config.workload_size_limit >= 0)

    @property
    def name(self) -> str:
        return PLUGIN_NAME

    @property
    def config(self) -> UnixAttestorConfig:
        return self._config

    async def attest(self, caller: Caller) -> frozenset[str]:
        """The caller's selectors, or :class:`WorkloadAttestationError`.

        On the event loop when nothing it needs may block (see the module's documentation), else
        in a worker thread.
        """
        if self._inline:
            try:
                return self._attest(caller, may_block=False)
            except _WouldBlock:
                pass
        return await asyncio.to_thread(self._attest, caller, may_block=True)

    def attest_blocking(self, caller: Caller) -> frozenset[str]:
        """:meth:`attest` on the calling thread (it may block on ``/proc``, NSS and hashing)."""
        return self._attest(caller, may_block=True)

    def _attest(self, caller: Caller, *, may_block: bool) -> frozenset[str]:
        pid = caller.pid
        try:
            dir_fd = os.open(f"{self._proc_root}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as err:
            raise WorkloadAttestationError(f"process {pid} has exited") from err
        except OSError as err:
            raise WorkloadAttestationError(f"cannot open the /proc directory of process {pid}: {err.strerror}") from err
        try:
            # Checked first so a reused PID is reported before its binary is read, and last
            # (below) because that check is the one that covers everything read in between.
            self._check_same_process(caller, dir_fd)
            selectors = {f"unix:uid:{caller.uid}", f"unix:gid:{caller.gid}"}
            user = _name(self._users, caller.uid, may_block)
            if user is not None:
                selectors.add(f"unix:user:{user}")
            group = _name(self._groups, caller.gid, may_block)
            if group is not None:
                selectors.add(f"unix:group:{group}")
            for gid in self._supplementary_groups(pid, dir_fd):
                selectors.add(f"unix:supplementary_gid:{gid}")
                name = _name(self._groups, gid, may_block)
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
        status = read_proc_file(pid, "status", dir_fd, limit=_STATUS_LIMIT)
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
        try:
            size = os.fstat(fd).st_size
            if limit and size > limit:
                log.warning(
                    "unix attestor: executable not hashed: its size exceeds workload_size_limit",
                    extra={"pid": pid, "size": size, "workload_size_limit": limit},
                )
                return None
            return self._digests.digest(fd)
        except OSError as err:
            raise WorkloadAttestationError(f"cannot read the executable of process {pid}: {err.strerror}") from err
        finally:
            os.close(fd)


def _name(cache: NameCache, key: int, may_block: bool) -> str | None:
    if may_block:
        return cache.get(key)
    try:
        return cache.cached(key)
    except KeyError:
        raise _WouldBlock from None


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
