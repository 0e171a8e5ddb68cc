"""The unix workload attestor against real processes (other users, groups, exited, zombie) and,
for what real processes cannot show (malformed files), against a /proc-shaped directory tree."""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import hashlib
import logging
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.agent.attestors.base import Caller, WorkloadAttestationError, parse_stat, read_stat
from sidecar.agent.attestors.unix import DigestCache, NameCache, UnixAttestor, UnixAttestorConfig, parse_groups

_sleep = shutil.which("sleep")
assert _sleep is not None
SLEEP: Final = Path(_sleep).resolve()  # /proc/<pid>/exe names the resolved file
UNNAMED_GID: Final = 4242  # a group id with no name on the test machine (checked below)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="starting processes as other users needs root")


def _names() -> tuple[pwd.struct_passwd, grp.struct_group, grp.struct_group]:
    try:
        return pwd.getpwnam("nobody"), grp.getgrnam("nogroup"), grp.getgrnam("users")
    except KeyError:
        pytest.skip("the test machine has no nobody user, nogroup group or users group")


@contextmanager
def running(argv: list[str] | None = None, **options: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A real process (``sleep 60`` unless told otherwise), killed and reaped afterwards."""
    process = subprocess.Popen(argv or [str(SLEEP), "60"], **options)  # noqa: S603
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def caller_of(process: subprocess.Popen[bytes], *, uid: int = 0, gid: int = 0) -> Caller:
    """The caller as the front door would record it (ids as if from SO_PEERCRED)."""
    return Caller(pid=process.pid, uid=uid, gid=gid, start_time=read_stat(process.pid).start_time)


def wait_for_state(pid: int, state: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if parse_stat((Path("/proc") / str(pid) / "stat").read_bytes()).state == state:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} never reached state {state}")


# --- real processes -----------------------------------------------------------------------------


@root_only
async def test_root_process_with_no_supplementary_groups() -> None:
    with running(extra_groups=[]) as process:
        selectors = await UnixAttestor().attest(caller_of(process))
    assert selectors == {"unix:uid:0", "unix:user:root", "unix:gid:0", "unix:group:root"}


@root_only
async def test_process_of_another_user_with_named_and_unnamed_supplementary_groups() -> None:
    nobody, nogroup, users = _names()
    with pytest.raises(KeyError):
        grp.getgrgid(UNNAMED_GID)
    with running(user=nobody.pw_uid, group=nogroup.gr_gid, extra_groups=[users.gr_gid, UNNAMED_GID]) as process:
        selectors = await UnixAttestor().attest(caller_of(process, uid=nobody.pw_uid, gid=nogroup.gr_gid))
    assert selectors == {
        f"unix:uid:{nobody.pw_uid}",
        "unix:user:nobody",
        f"unix:gid:{nogroup.gr_gid}",
        "unix:group:nogroup",
        f"unix:supplementary_gid:{users.gr_gid}",
        "unix:supplementary_group:users",
        f"unix:supplementary_gid:{UNNAMED_GID}",
    }


@root_only
async def test_ids_without_names_give_no_name_selectors() -> None:
    with running(user=54321, group=54322, extra_groups=[54323]) as process:
        selectors = await UnixAttestor().attest(caller_of(process, uid=54321, gid=54322))
    assert selectors == {"unix:uid:54321", "unix:gid:54322", "unix:supplementary_gid:54323"}


@root_only
async def test_uid_and_gid_come_from_the_connection_not_from_proc() -> None:
    # The front door records the effective ids of the connection (SO_PEERCRED); a process that
    # changed its ids afterwards is still attested as who it was when it connected.
    with running(extra_groups=[]) as process:
        selectors = await UnixAttestor().attest(caller_of(process, uid=54321, gid=54322))
    assert selectors == {"unix:uid:54321", "unix:gid:54322"}


@root_only
async def test_path_and_sha256_of_the_executable() -> None:
    attestor = UnixAttestor(UnixAttestorConfig(discover_workload_path=True))
    with running(extra_groups=[]) as process:
        selectors = await attestor.attest(caller_of(process))
    digest = hashlib.sha256(SLEEP.read_bytes()).hexdigest()
    assert selectors == {
        "unix:uid:0",
        "unix:user:root",
        "unix:gid:0",
        "unix:group:root",
        f"unix:path:{SLEEP}",
        f"unix:sha256:{digest}",
    }


async def test_deleted_executable_is_hashed_through_proc(tmp_path: Path) -> None:
    copy = tmp_path / "workload"
    shutil.copy2(SLEEP, copy)
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    attestor = UnixAttestor(UnixAttestorConfig(discover_workload_path=True))
    with running([str(copy), "60"]) as process:
        copy.unlink()
        selectors = await attestor.attest(caller_of(process, uid=os.getuid(), gid=os.getgid()))
    assert f"unix:path:{copy} (deleted)" in selectors
    assert f"unix:sha256:{digest}" in selectors


@pytest.mark.parametrize(
    ("limit", "hashed", "warned"),
    [
        pytest.param(lambda size: 0, True, False, id="no-limit"),
        pytest.param(lambda size: size, True, False, id="at-limit"),
        pytest.param(lambda size: size - 1, False, True, id="over-limit"),
        pytest.param(lambda size: -1, False, False, id="never-hash"),
    ],
)
async def test_workload_size_limit(
    limit: Callable[[int], int], hashed: bool, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    size = SLEEP.stat().st_size
    limit_bytes = limit(size)
    attestor = UnixAttestor(UnixAttestorConfig(discover_workload_path=True, workload_size_limit=limit_bytes))
    with caplog.at_level(logging.WARNING, logger="sidecar.agent.attestors.unix"), running() as process:
        selectors = await attestor.attest(caller_of(process, uid=os.getuid(), gid=os.getgid()))
    assert f"unix:path:{SLEEP}" in selectors
    assert any(s.startswith("unix:sha256:") for s in selectors) is hashed
    warnings = [r for r in caplog.records if r.name == "sidecar.agent.attestors.unix"]
    assert bool(warnings) is warned
    if warned:
        assert warnings[0].getMessage() == "unix attestor: executable not hashed: its size exceeds workload_size_limit"
        assert (warnings[0].__dict__["size"], warnings[0].__dict__["workload_size_limit"]) == (size, size - 1)


async def test_process_that_exited_and_was_reaped() -> None:
    with running() as process:
        caller = caller_of(process)
        process.kill()
        process.wait()
    with pytest.raises(WorkloadAttestationError) as raised:
        await UnixAttestor().attest(caller)
    assert str(raised.value) == f"workload: process {caller.pid} has exited"


async def test_zombie_process_has_exited() -> None:
    with running() as process:
        caller = caller_of(process)
        process.send_signal(signal.SIGKILL)
        wait_for_state(process.pid, "Z")  # not reaped yet: the pid is still taken
        with pytest.raises(WorkloadAttestationError) as raised:
            await UnixAttestor(UnixAttestorConfig(discover_workload_path=True)).attest(caller)
    assert str(raised.value) == f"workload: process {caller.pid} has exited"


async def test_reused_pid_is_not_the_caller() -> None:
    with running() as process:
        caller = caller_of(process)
        impostor_view = dataclasses.replace(caller, start_time=caller.start_time + 1)
        with pytest.raises(WorkloadAttestationError) as raised:
            await UnixAttestor().attest(impostor_view)
    assert str(raised.value) == (
        f"workload: process {caller.pid} is not the caller: it started at tick {caller.start_time}, "
        f"the caller at tick {caller.start_time + 1} (the caller exited and its pid was reused)"
    )


async def test_attestation_does_not_block_the_event_loop() -> None:
    # Hashing a large executable happens in a worker thread: the loop keeps ticking meanwhile.
    attestor = UnixAttestor(UnixAttestorConfig(discover_workload_path=True))
    with running() as process:
        caller = caller_of(process, uid=os.getuid(), gid=os.getgid())
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await attestor.attest(caller)
        ticker.cancel()
    assert ticks > 1


# --- a /proc-shaped tree for malformed files ----------------------------------------------------

STAT_TAIL: Final = b" S 1 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 4242 1000 100 0 0 0 0\n"
GOOD_STATUS: Final = b"Name:\tw\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t100 4242 \nVmRSS:\t1 kB\n"
FAKE_PID: Final = 77


def fake_proc(root: Path, *, stat: bytes | None, status: bytes | None = GOOD_STATUS) -> Path:
    directory = root / str(FAKE_PID)
    directory.mkdir(parents=True)
    if stat is not None:
        (directory / "stat").write_bytes(stat)
    if status is not None:
        (directory / "status").write_bytes(status)
    (directory / "exe").symlink_to(SLEEP)
    return root


FAKE_CALLER: Final = Caller(pid=FAKE_PID, uid=54321, gid=54322, start_time=4242)


async def test_fake_tree_with_a_command_name_full_of_parentheses(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, stat=b"77 (a) b ( c ) (d)" + STAT_TAIL)
    attestor = UnixAttestor(UnixAttestorConfig(discover_workload_path=True), proc_root=proc)
    assert await attestor.attest(FAKE_CALLER) == {
        "unix:uid:54321",
        "unix:gid:54322",
        "unix:supplementary_gid:100",
        f"unix:supplementary_group:{grp.getgrgid(100).gr_name}",
        "unix:supplementary_gid:4242",
        f"unix:path:{SLEEP}",
        f"unix:sha256:{hashlib.sha256(SLEEP.read_bytes()).hexdigest()}",
    }


STAT: Final = b"77 (w)" + STAT_TAIL
REUSED: Final = "process 77 is not the caller: it started at tick 4243, the caller at tick 4242 (the caller exited and its pid was reused)"  # noqa: E501


@pytest.mark.parametrize(
    ("stat", "status", "message"),
    [
        pytest.param(None, GOOD_STATUS, "process 77 has exited", id="no-stat"),
        pytest.param(b"77 (w) Z" + STAT_TAIL[2:], GOOD_STATUS, "process 77 has exited", id="zombie"),
        pytest.param(b"", GOOD_STATUS, "malformed stat of process 77: no command name in parentheses", id="empty"),
        pytest.param(
            b"77 (w" + STAT_TAIL,
            GOOD_STATUS,
            "malformed stat of process 77: no command name in parentheses",
            id="no-paren",
        ),
        pytest.param(
            b"77 (w) S 1 1 1\n", GOOD_STATUS, "malformed stat of process 77: 6 fields, want at least 22", id="truncated"
        ),
        pytest.param(
            STAT.replace(b" 4242 ", b" 42x2 "),
            GOOD_STATUS,
            "malformed stat of process 77: start time b'42x2' is not a number",
            id="start-time",
        ),
        pytest.param(
            b"77 (w) SS" + STAT_TAIL[2:],
            GOOD_STATUS,
            "malformed stat of process 77: process state b'SS' is not one letter",
            id="state",
        ),
        pytest.param(STAT, b"Name:\tw\n", "malformed status of process 77: no Groups line", id="no-groups"),
        pytest.param(
            STAT, b"Groups:\t1 x\n", "malformed status of process 77: group id b'x' is not a number", id="bad-group"
        ),
        pytest.param(STAT, None, "process 77 has exited", id="no-status"),
        pytest.param(STAT.replace(b" 4242 ", b" 4243 "), GOOD_STATUS, REUSED, id="reused"),
    ],
)
async def test_fake_tree_errors(tmp_path: Path, stat: bytes | None, status: bytes | None, message: str) -> None:
    proc = fake_proc(tmp_path, stat=stat, status=status)
    with pytest.raises(WorkloadAttestationError) as raised:
        await UnixAttestor(proc_root=proc).attest(FAKE_CALLER)
    assert str(raised.value) == f"workload: {message}"


async def test_fake_tree_without_the_process(tmp_path: Path) -> None:
    with pytest.raises(WorkloadAttestationError) as raised:
        await UnixAttestor(proc_root=tmp_path).attest(FAKE_CALLER)
    assert str(raised.value) == "workload: process 77 has exited"


async def test_fake_tree_without_an_executable(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, stat=b"77 (w)" + STAT_TAIL)
    (proc / str(FAKE_PID) / "exe").unlink()
    with pytest.raises(WorkloadAttestationError) as raised:
        await UnixAttestor(UnixAttestorConfig(discover_workload_path=True), proc_root=proc).attest(FAKE_CALLER)
    assert str(raised.value) == "workload: process 77 has exited or has no executable"


# --- parsers and config ---------------------------------------------------------------------


@given(comm=st.binary(max_size=64), state=st.sampled_from("RSDZTtXIPK"), start=st.integers(0, 2**64))
def test_parse_stat_finds_field_22_whatever_the_command_name(comm: bytes, state: str, start: int) -> None:
    fields = [state, *("0" for _ in range(18)), str(start), "1000", "1"]
    parsed = parse_stat(b"123 (" + comm + b") " + " ".join(fields).encode() + b"\n")
    assert (parsed.state, parsed.start_time) == (state, start)


def test_parse_stat_of_this_process() -> None:
    stat = read_stat(os.getpid())
    assert stat.state in {"R", "S"}
    assert stat.start_time > 0


@pytest.mark.parametrize(
    ("status", "groups"),
    [
        (b"Name:\tx\nGroups:\t\nVmRSS:\t1 kB\n", ()),
        (b"Groups:\t0 100 65534 \n", (0, 100, 65534)),
        (b"Name:\tGroups: 1\nGroups:\t7\n", (7,)),  # only a line that starts with Groups:
    ],
)
def test_parse_groups(status: bytes, groups: tuple[int, ...]) -> None:
    assert parse_groups(status) == groups


def test_config_is_typed() -> None:
    with pytest.raises(TypeError, match="discover_workload_path must be a bool"):
        UnixAttestorConfig(discover_workload_path="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="workload_size_limit must be an integer"):
        UnixAttestorConfig(workload_size_limit=True)
    assert UnixAttestor().name == "unix"
    assert UnixAttestor().config == UnixAttestorConfig(discover_workload_path=False, workload_size_limit=0)


# --- caches: names by id, digests by file identity; nothing per process ------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingLookup:
    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.calls: list[int] = []

    def __call__(self, key: int) -> str | None:
        self.calls.append(key)
        return self.names.get(key)


def test_name_cache_keeps_answers_for_the_ttl() -> None:
    clock = FakeClock()
    lookup = CountingLookup({0: "root"})
    names = NameCache(lookup, ttl=30.0, clock=clock)
    with pytest.raises(KeyError):
        names.cached(0)
    assert names.get(0) == "root"
    assert names.get(7) is None  # "no such id" is an answer too
    clock.now += 29.9
    assert (names.get(0), names.cached(0), names.get(7)) == ("root", "root", None)
    assert lookup.calls == [0, 7]
    lookup.names[0] = "renamed"
    clock.now += 0.1  # expired: asked again
    with pytest.raises(KeyError):
        names.cached(0)
    assert names.get(0) == "renamed"
    assert lookup.calls == [0, 7, 0]


def test_name_cache_is_bounded() -> None:
    lookup = CountingLookup({})
    names = NameCache(lookup, max_size=2, clock=FakeClock())
    for key in (1, 2, 3):
        names.get(key)
    assert len(names) == 2
    names.get(1)  # the oldest answer was dropped
    assert lookup.calls == [1, 2, 3, 1]
    with pytest.raises(ValueError, match="max_size must be at least 1"):
        NameCache(lookup, max_size=0)
    with pytest.raises(ValueError, match="ttl must not be negative"):
        NameCache(lookup, ttl=-1)


def _settled(path: Path) -> float:
    """A wall clock for which ``path``'s last change is long past (it was just written)."""
    return path.stat().st_ctime + 3600


def test_digest_cache_hits_for_the_same_file(tmp_path: Path) -> None:
    program = tmp_path / "program"
    program.write_bytes(b"first version")
    digests = DigestCache(wall_clock=lambda: _settled(program))
    fd = os.open(program, os.O_RDONLY)
    try:
        assert digests.digest(fd) == hashlib.sha256(b"first version").hexdigest()
        assert len(digests) == 1
        assert digests.digest(fd) == hashlib.sha256(b"first version").hexdigest()
    finally:
        os.close(fd)


@pytest.mark.parametrize("change", ["same-size-rewrite", "mtime-set-back", "replaced-by-rename"])
def test_digest_cache_misses_when_the_file_changes(tmp_path: Path, change: str) -> None:
    program = tmp_path / "program"
    program.write_bytes(b"first version")
    old = program.stat()
    digests = DigestCache(wall_clock=lambda: time.time() + 3600)
    fd = os.open(program, os.O_RDONLY)
    try:
        digests.digest(fd)
    finally:
        os.close(fd)
    time.sleep(0.01)  # past the file system's timestamp granularity
    if change == "replaced-by-rename":
        (tmp_path / "new").write_bytes(b"other version")
        (tmp_path / "new").rename(program)
    else:
        with program.open("r+b") as file:  # in place: same inode, same size
            file.write(b"other version")
    if change == "mtime-set-back":
        os.utime(program, ns=(old.st_atime_ns, old.st_mtime_ns))  # ctime still moves
    fd = os.open(program, os.O_RDONLY)
    try:
        assert digests.digest(fd) == hashlib.sha256(b"other version").hexdigest()
    finally:
        os.close(fd)


def test_digest_cache_keeps_nothing_of_a_file_changed_just_before(tmp_path: Path) -> None:
    # A file changed less than `settle` seconds before hashing is hashed every time: its ctime
    # could be shared by a file that reuses its inode within the file system's clock granularity.
    program = tmp_path / "program"
    program.write_bytes(b"fresh")
    digests = DigestCache(settle=2.0, wall_clock=lambda: program.stat().st_ctime + 1.0)
    fd = os.open(program, os.O_RDONLY)
    try:
        assert digests.digest(fd) == hashlib.sha256(b"fresh").hexdigest()
    finally:
        os.close(fd)
    assert len(digests) == 0


def test_digest_cache_is_bounded(tmp_path: Path) -> None:
    digests = DigestCache(max_size=2, wall_clock=lambda: time.time() + 3600)
    for index in range(3):
        path = tmp_path / f"program-{index}"
        path.write_bytes(b"x" * index)
        fd = os.open(path, os.O_RDONLY)
        try:
            digests.digest(fd)
        finally:
            os.close(fd)
    assert len(digests) == 2
    with pytest.raises(ValueError, match="max_size must be at least 1"):
        DigestCache(max_size=0)


class ThreadCount:
    """Counts the attestations that went to a worker thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = asyncio.to_thread

        async def to_thread(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await original(func, *args, **kwargs)

        monkeypatch.setattr(asyncio, "to_thread", to_thread)


async def test_attestation_with_cached_names_runs_on_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = ThreadCount(monkeypatch)
    users, groups = CountingLookup({0: "root"}), CountingLookup({0: "root"})
    attestor = UnixAttestor(users=NameCache(users), groups=NameCache(groups))
    with running() as process:
        caller = caller_of(process)
        first = await attestor.attest(caller)
        assert threads.calls == 1  # the names were asked in a worker thread
        assert await attestor.attest(caller) == first
        assert threads.calls == 1  # then on the loop, from the cache
    assert (users.calls, groups.calls) == ([0], [0])


async def test_hashing_always_runs_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # Opening the executable may stall on a FUSE or network file system.
    threads = ThreadCount(monkeypatch)
    attestor = UnixAttestor(UnixAttestorConfig(discover_workload_path=True))
    with running() as process:
        caller = caller_of(process, uid=os.getuid(), gid=os.getgid())
        await attestor.attest(caller)
        await attestor.attest(caller)
    assert threads.calls == 2
    never_hash = UnixAttestor(UnixAttestorConfig(discover_workload_path=True, workload_size_limit=-1))
    with running() as process:
        caller = caller_of(process, uid=os.getuid(), gid=os.getgid())
        await never_hash.attest(caller)
        await never_hash.attest(caller)
    assert threads.calls == 3  # the path alone is read on the loop once the names are cached


async def test_nothing_of_a_process_is_cached_a_reused_pid_is_still_caught() -> None:
    attestor = UnixAttestor()
    with running() as process:
        caller = caller_of(process)
        await attestor.attest(caller)  # names now cached
        with pytest.raises(WorkloadAttestationError, match="is not the caller"):
            await attestor.attest(dataclasses.replace(caller, start_time=caller.start_time + 1))
        assert await attestor.attest(dataclasses.replace(caller, uid=54321, gid=54322)) >= {
            "unix:uid:54321",
            "unix:gid:54322",
        }


@root_only
async def test_each_process_gets_its_own_supplementary_groups_with_a_warm_cache() -> None:
    attestor = UnixAttestor()
    with running(extra_groups=[100]) as with_group, running(extra_groups=[]) as without:
        assert "unix:supplementary_gid:100" in await attestor.attest(caller_of(with_group))
        assert not any("supplementary" in s for s in await attestor.attest(caller_of(without)))


async def test_exec_changes_path_and_digest_at_once(tmp_path: Path) -> None:
    # exec keeps the pid and the start time: the executable is read anew on every call.
    shell = shutil.which("sh")
    assert shell is not None
    attestor = UnixAttestor(
        UnixAttestorConfig(discover_workload_path=True), digests=DigestCache(wall_clock=lambda: time.time() + 3600)
    )
    with running([shell, "-c", f"read line; exec {SLEEP} 60"], stdin=subprocess.PIPE) as process:
        caller = caller_of(process, uid=os.getuid(), gid=os.getgid())
        before = await attestor.attest(caller)
        assert f"unix:path:{SLEEP}" not in before
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.close()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{process.pid}/exe").resolve() != SLEEP:
            assert time.monotonic() < deadline, "the shell never ran exec"
            time.sleep(0.005)
        assert read_stat(process.pid).start_time == caller.start_time
        after = await attestor.attest(caller)
    assert f"unix:path:{SLEEP}" in after
    assert f"unix:sha256:{hashlib.sha256(SLEEP.read_bytes()).hexdigest()}" in after
    assert not any(s.startswith("unix:sha256:") and s in before for s in after)
