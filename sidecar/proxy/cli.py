"""The ``spiffe-proxy`` command.

The proxy (``--listen``, ``--upstream``, ``--allow-*`` ...) is not built yet; until it is, the
command answers ``--help`` and ``--version`` and says so.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

DESCRIPTION = """\
spiffe-proxy: an mTLS TCP proxy that puts SPIFFE identities and authorization by SPIFFE ID in
front of services that know nothing of SPIFFE (server mode), or lets them call SPIFFE services
(client mode), with certificates rotating under live traffic.

The proxy is not available in this release yet: it is under construction.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spiffe-proxy", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
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
