"""Telling the application: a signal to a pid file's process, or a command started, signalled, restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.helper.process import Command, PidFileError, signal_pid, signal_pid_file
from tests.sidecar.helper.conftest import RunHelper, Served, wait_for

PROGRAMS = str(Path(__file__).with_name("programs.py"))


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _app_args(log: Path) -> tuple[str, ...]:
    return (PROGRAMS, "app", str(log))


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path, Path]]:
    """The application, started by the test, writing its pid file."""
    log, pid_file = tmp_path / "app.log", tmp_path / "app.pid"
    process = await asyncio.create_subprocess_exec(sys.executable, PROGRAMS, "app", str(log), str(pid_file))
    await wait_for(lambda: _lines(log) == [f"start {process.pid}"], "the application to start")
    yield process, log, pid_file
    if process.returncode is None:
        process.terminate()
    await process.wait()


async def test_the_pid_files_process_is_signalled_after_every_write(
    served: Served, run_helper: RunHelper, app: tuple[asyncio.subprocess.Process, Path, Path]
) -> None:
    process, log, pid_file = app
    running = await run_helper(pid_file=pid_file, signal="SIGHUP")
    await wait_for(lambda: f"hup {process.pid}" in _lines(log), "the first signal")
    served.identities.rotate()
    await running.updates_past(1)
    await wait_for(lambda: _lines(log).count(f"hup {process.pid}") == 2, "the second signal")


async def test_pid_file_problems_are_explained(tmp_path: Path) -> None:
    pid_file = tmp_path / "app.pid"
    with pytest.raises(PidFileError, match="does not exist"):
        signal_pid(pid_file, signal.SIGHUP)
    pid_file.write_text("nginx\n")
    with pytest.raises(PidFileError, match="does not hold a process id: 'nginx'"):
        signal_pid(pid_file, signal.SIGHUP)
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await process.wait()
    pid_file.write_text(f"{process.pid}\n")
    with pytest.raises(PidFileError, match=f"no process {process.pid}"):
        signal_pid(pid_file, signal.SIGHUP)
    assert not await signal_pid_file(pid_file, signal.SIGHUP, attempts=2, first_delay=0.01)


async def test_the_command_starts_after_the_first_write_and_restarts_on_updates(
    served: Served, cert_dir: Path, tmp_path: Path, run_helper: RunHelper
) -> None:
    log = tmp_path / "cmd.log"
    running = await run_helper(cmd=sys.executable, cmd_args=_app_args(log))
    await wait_for(lambda: len(_lines(log)) == 1, "the command to start")
    assert (cert_dir / "svid.pem").exists()  # started after the first write
    first = running.helper.command
    assert first is not None
    assert first.process is not None
    pid = first.process.pid
    served.identities.rotate()
    await running.updates_past(1)
    await wait_for(lambda: len(_lines(log)) == 3, "the restart")
    assert _lines(log)[:2] == [f"start {pid}", f"term {pid}"]
    assert _lines(log)[2].startswith("start ")
    assert _lines(log)[2] != f"start {pid}"
    assert first.starts == 2


async def test_the_command_is_signalled_with_renew_signal(
    served: Served, tmp_path: Path, run_helper: RunHelper
) -> None:
    log = tmp_path / "cmd.log"
    running = await run_helper(cmd=sys.executable, cmd_args=_app_args(log), renew_signal="SIGHUP")
    await wait_for(lambda: len(_lines(log)) == 1, "the command to start")
    pid = int(_lines(log)[0].split()[1])
    for count in range(1, 3):
        served.identities.rotate()
        await running.updates_past(count)
        await wait_for(lambda: _lines(log).count(f"hup {pid}") == count, f"signal {count}")  # noqa: B023
    assert running.helper.command is not None
    assert running.helper.command.starts == 1


async def test_a_command_that_exits_is_logged_and_started_on_the_next_update(
    served: Served, tmp_path: Path, run_helper: RunHelper, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "cmd.log"
    running = await run_helper(cmd=sys.executable, cmd_args=_app_args(log), renew_signal="SIGHUP")
    await wait_for(lambda: len(_lines(log)) == 1, "the command to start")
    pid = int(_lines(log)[0].split()[1])
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: "the command exited on its own" in caplog.text, "the exit to be logged")
    record = next(r for r in caplog.records if r.getMessage().startswith("the command exited on its own"))
    assert record.exit_code == -signal.SIGKILL  # type: ignore[attr-defined]
    await asyncio.sleep(0.3)
    assert len(_lines(log)) == 1  # not restarted in a loop: only on the next update
    served.identities.rotate()
    await running.updates_past(1)
    await wait_for(lambda: len(_lines(log)) == 2, "the command to start again")
    assert _lines(log)[1].startswith("start ")


async def test_shutdown_forwards_the_signal_to_the_command(
    served: Served, tmp_path: Path, run_helper: RunHelper
) -> None:
    log = tmp_path / "cmd.log"
    running = await run_helper(cmd=sys.executable, cmd_args=_app_args(log))
    await wait_for(lambda: len(_lines(log)) == 1, "the command to start")
    pid = int(_lines(log)[0].split()[1])
    running.stop.set()
    await asyncio.wait_for(running.task, 15)
    assert _lines(log) == [f"start {pid}", f"term {pid}"]
    assert running.helper.command is not None
    assert not running.helper.command.running


async def test_a_command_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    )
    command = Command(sys.executable, ("-c", script), grace=0.5)
    await command.notify()
    assert command.running
    await asyncio.sleep(0.3)  # let it install its handler
    assert await command.stop() == -signal.SIGKILL


async def test_a_missing_program_is_logged_and_tried_again(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    command = Command(str(tmp_path / "no-such-program"))
    await command.notify()
    assert not command.running
    assert "cannot start the command" in caplog.text
