"""The ``spiffe-agent`` command.

The agent's commands (``run``, ``api fetch``, ``api watch``, ``helper``, ``healthcheck`` ...) are
not built yet; until they are, the command answers ``--help`` and ``--version`` and says so.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

DESCRIPTION = """\
spiffe-agent: the spiffe-sidecar node agent. It attests its node to the control plane, keeps
the SVIDs of the node's workloads fresh, and serves the SPIFFE Workload API and Envoy SDS on one
unix socket.

No commands are available in this release yet: the agent is under construction.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spiffe-agent", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
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
