"""A server killed with SIGKILL in the middle of a burst of entry creations loses no acknowledged entry.

The store is then consistent: revisions 1..N each have exactly one event, every entry's revision
is its last event's, and the SQLite file passes its integrity check.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from controlplane.store import Store
from controlplane.store.schema import entry_events, entry_selectors, registration_entries

ROOT = Path(__file__).resolve().parents[3]
ACKNOWLEDGED_BEFORE_KILL = 300


def test_sigkill_mid_burst_loses_no_acknowledged_entry(store_url: str) -> None:
    Store.open(store_url).close()  # migrate before the burst; the burst process opens with migrate=False
    process = subprocess.Popen(  # noqa: S603 (our own interpreter and module, a URL we made)
        [sys.executable, "-m", "tests.controlplane.store.burst", store_url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    acknowledged: dict[str, int] = {}
    try:
        for line in process.stdout:
            entry_id, acked_revision = line.split()
            acknowledged[entry_id] = int(acked_revision)
            if len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL:
                os.kill(process.pid, signal.SIGKILL)
                break
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        rest, _ = process.communicate(timeout=30)
    for line in rest.splitlines():  # acknowledged between our kill and the process's death
        entry_id, acked_revision = line.split()
        acknowledged[entry_id] = int(acked_revision)
    assert process.returncode == -signal.SIGKILL
    assert len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL

    with Store.open(store_url) as store:
        entries = {e.id: e for e in store.list_entries()}
        revision = store.current_revision()
        with store.engine.connect() as connection:
            events = connection.execute(select(entry_events).order_by(entry_events.c.revision)).all()
            orphans = connection.execute(
                select(entry_selectors.c.entry_id).where(
                    entry_selectors.c.entry_id.not_in(select(registration_entries.c.id))
                )
            ).all()
            if store.dialect == "sqlite":
                assert connection.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"

    assert {entry_id: entries[entry_id].revision for entry_id in acknowledged if entry_id in entries} == acknowledged
    assert [event.revision for event in events] == list(range(1, revision + 1))
    assert all(event.kind == "create" for event in events)
    assert {event.entry_id: event.revision for event in events} == {e.id: e.revision for e in entries.values()}
    assert orphans == []
