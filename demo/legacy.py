"""What the legacy step of the demo needs around ``spiffe-proxy``: a Python of its own, its log.

The agent tells the demo's workloads apart by the path of their executable (``unix:path``). The
Envoys each run through a hard link to the Envoy binary; ``spiffe-proxy`` is a Python program, and
every Python program on this node is the demo's "intruder" (its entry selects the interpreter's
path). So the proxy, too, runs through a path of its own: :func:`own_python` makes a hard link to
the interpreter inside a small virtual environment that shares this one's packages, and the
proxy's entry selects that path.
"""

from __future__ import annotations

import json
import re
import sys
import sysconfig
from pathlib import Path
from typing import Any, Final

from demo.envoy import own_path

PROXY_READY: Final = re.compile(
    r"spiffe-proxy ready: server mode, listening on (?P<listen>\S+), upstream (?P<upstream>\S+), "
    r"identity (?P<id>spiffe://[^,\s]+)(, .*)?"
)


def own_python(directory: Path) -> Path:
    """This interpreter under ``directory/bin``, in a virtual environment with this one's packages."""
    real = Path(sys.executable).resolve()
    clone = own_path(real, directory / "bin", real.name)
    (directory / "pyvenv.cfg").write_text(f"home = {real.parent}\ninclude-system-site-packages = false\n")
    site = directory / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    site.parent.mkdir(parents=True, exist_ok=True)
    site.symlink_to(sysconfig.get_paths()["purelib"])
    return clone.resolve()


def log_records(path: Path, message: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``spiffe-proxy`` (its stderr, in ``path``) whose message is ``message``."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if isinstance(record, dict) and record.get("msg") == message:
            records.append(record)
    return records
