"""A server-like process for the durability test: creates entries in a loop until it is killed.

``python -m tests.controlplane.store.burst <url>`` prints ``<entry id> <revision>`` on stdout for
each entry *after* its transaction committed, i.e. every acknowledged entry, and flushes at once.
Four threads write at once, so the kill also lands between concurrent transactions.
"""

from __future__ import annotations

import sys
import threading

from controlplane.store import Store
from tests.controlplane.store.support import make_entry

THREADS = 4


def burst(store: Store, worker: int, lock: threading.Lock) -> None:
    for i in range(1_000_000):
        entry = store.create_entry(make_entry(f"burst-{worker}-{i}", selectors=(f"unix:uid:{i}",)))
        with lock:
            sys.stdout.write(f"{entry.id} {entry.revision}\n")
            sys.stdout.flush()


def main() -> None:
    store = Store.open(sys.argv[1], migrate=False)
    lock = threading.Lock()
    threads = [threading.Thread(target=burst, args=(store, n, lock), daemon=True) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
