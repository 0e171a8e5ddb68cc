"""The ``spiffe-server`` command.

The control plane's commands (``run``, ``entry``, ``agent``, ``token``, ``bundle`` ...) are not
built yet; until they are, the command answers ``--help`` and ``--version`` and says so.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

DESCRIPTION = """\
spiffe-server: the spiffe-sidecar control plane. It signs X.509- and JWT-SVIDs, stores
registration entries, attests node agents and serves the agent and registration APIs.

No commands are available in this release yet: the control plane is under construction.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spiffe-server", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('spiffe-sidecar')}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
