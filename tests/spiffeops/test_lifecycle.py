"""Shutdown signals (real ones, sent to this process) and private files (real ones, on disk)."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from spiffeops.lifecycle import wait_for_shutdown_signal, write_atomically

# --- signals -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_signal_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    yield
    for sig, handler in saved.items():
        if handler is not None:
            signal.signal(sig, handler)


async def _started(*signals: signal.Signals) -> asyncio.Task[signal.Signals]:
    task = asyncio.create_task(wait_for_shutdown_signal(signals) if signals else wait_for_shutdown_signal())
    await asyncio.sleep(0)  # the task runs up to its wait: the handlers are installed
    return task


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_the_default_signals(sig: signal.Signals) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    task = await _started()
    os.kill(os.getpid(), sig)
    async with asyncio.timeout(10):
        assert await task is sig
    # Put back as they were: asyncio alone would leave SIG_DFL and default_int_handler, dropping
    # for example the asyncio runner's own SIGINT handler.
    assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} == before


async def test_only_the_signals_asked_for() -> None:
    seen: list[int] = []

    def on_usr2(number: int, frame: FrameType | None) -> None:
        seen.append(number)

    signal.signal(signal.SIGUSR2, on_usr2)
    task = await _started(signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR2)
    await asyncio.sleep(0.05)
    assert seen == [signal.SIGUSR2]
    assert not task.done()
    os.kill(os.getpid(), signal.SIGUSR1)
    async with asyncio.timeout(10):
        assert await task is signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGUSR2) is on_usr2


async def test_the_previous_handler_is_put_back() -> None:
    def previous(number: int, frame: FrameType | None) -> None:
        raise AssertionError("not while waiting")

    signal.signal(signal.SIGUSR1, previous)
    task = await _started(signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR1)
    async with asyncio.timeout(10):
        assert await task is signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is previous


async def test_cancelling_the_wait_removes_the_handlers() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    task = await _started()
    assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} == before


async def test_two_signals_at_once_report_the_first() -> None:
    task = await _started(signal.SIGUSR1, signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGUSR1)
    async with asyncio.timeout(10):
        assert await task is signal.SIGUSR2


# --- private files -----------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_writes_a_new_private_file(tmp_path: Path) -> None:
    path = tmp_path / "svid_key.pem"
    write_atomically(path, b"-----BEGIN PRIVATE KEY-----\n")
    assert path.read_bytes() == b"-----BEGIN PRIVATE KEY-----\n"
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svid_key.pem"]


def test_replaces_a_file_and_its_open_permissions(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(b"old key, much longer than the new one")
    path.chmod(0o644)
    write_atomically(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o600


def test_a_reader_of_the_old_file_keeps_the_old_contents(tmp_path: Path) -> None:
    path = tmp_path / "bundle.pem"
    write_atomically(path, b"old")
    with path.open("rb") as reader:
        write_atomically(path, b"new")
        assert reader.read() == b"old"  # a new inode, renamed over: never a half-written file
    assert path.read_bytes() == b"new"


def test_the_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomically(tmp_path / "shared.pem", b"x", mode=0o640)
        write_atomically(tmp_path / "empty", b"", mode=0o400)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "shared.pem") == 0o640
    assert _mode(tmp_path / "empty") == 0o400
    assert (tmp_path / "empty").read_bytes() == b""


def test_a_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    link = tmp_path / "key.pem"
    link.symlink_to(victim)
    write_atomically(link, b"key")
    assert not link.is_symlink()
    assert link.read_bytes() == b"key"
    assert victim.read_bytes() == b"untouched"


def test_large_data(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    write_atomically(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a_directory"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        write_atomically(target, b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["a_directory"]
    assert list(target.iterdir()) == []


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "no" / "key.pem", b"x")


@pytest.mark.parametrize("mode", [0o1600, 0o4700, 0o10600])
def test_mode_must_be_permission_bits(tmp_path: Path, mode: int) -> None:
    with pytest.raises(ValueError, match=f"^lifecycle: mode must be permission bits only, got {oct(mode)}$"):
        write_atomically(tmp_path / "k", b"x", mode=mode)
    assert list(tmp_path.iterdir()) == []
