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
from sidecar.agent.attestors.unix import UnixAttestor, UnixAttestorConfig, parse_groups

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
