"""The caller of the agent's socket, and the interface every workload attestor implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from spiffecore import SpiffeError


class WorkloadAttestationError(SpiffeError):
    """The calling process could not be attested (it exited, or its PID was reused meanwhile)."""

    layer = "workload"


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """A process connected to the agent's socket, as the kernel reported it (SO_PEERCRED).

    ``start_time`` is the process's start time in clock ticks since boot (field 22 of
    ``/proc/<pid>/stat``), read when the connection was accepted: an attestor checks it again
    after reading the process's attributes, so a PID reused by another process is never
    mistaken for the caller.
    """

    pid: int
    uid: int
    gid: int
    start_time: int


class WorkloadAttestor(Protocol):
    """Selectors (``type:value`` strings such as ``unix:uid:1000``) for a caller."""

    @property
    def name(self) -> str: ...

    async def attest(self, caller: Caller) -> frozenset[str]:
        """The caller's selectors, or :class:`WorkloadAttestationError`."""
        ...
