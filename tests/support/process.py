"""Starting one of our long-running commands as a real process and waiting for its ready line.

Every command prints exactly one line on stdout when it is ready (``spiffe-server ready: ...``,
``spiffe-agent ready: ...``). :func:`start_until_ready` runs the command with stdout and stderr
in files (so a chatty process never blocks on a full pipe), waits for that line, checks it against
the command's pattern, and on any failure kills the process and reports both outputs.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO


@dataclass
class Started:
    """A process that printed its ready line, with its output files (kept open until it stops)."""

    process: subprocess.Popen[bytes]
    ready: re.Match[str]
    stdout_path: Path
    stderr_path: Path
    stdout: IO[bytes]
    stderr: IO[bytes]


def start_until_ready(
    argv: Sequence[str],
    *,
    logs: Path,
    name: str,
    ready: re.Pattern[str],
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> Started:
    """Start ``argv`` (in ``env``, or this process's environment); return once it printed one line
    matching ``ready``, or fail the test."""
    stamp = time.monotonic_ns()
    stdout_path = logs / f"stdout-{stamp}.txt"
    stderr_path = logs / f"stderr-{stamp}.txt"
    stdout = stdout_path.open("wb")
    stderr = stderr_path.open("wb")
    process = subprocess.Popen(list(argv), stdout=stdout, stderr=stderr, env=env)  # noqa: S603 - our own console scripts

    def fail(reason: str, text: str) -> AssertionError:
        if process.poll() is None:
            process.kill()
        process.wait()
        stdout.close()
        stderr.close()
        return AssertionError(
            f"{name} {reason} (exit code {process.returncode})\n"
            f"stdout: {text}\nstderr: {stderr_path.read_text(errors='replace')}"
        )

    deadline = time.monotonic() + timeout
    while True:
        text = stdout_path.read_text(errors="replace")
        if "\n" in text:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            raise fail("did not become ready", text)
        time.sleep(0.02)
    lines = text.splitlines()
    match = ready.fullmatch(lines[0])
    if len(lines) != 1 or match is None:
        raise fail("printed an unexpected ready line", text)
    return Started(process, match, stdout_path, stderr_path, stdout, stderr)
