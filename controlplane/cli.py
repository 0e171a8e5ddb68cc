"""The ``spiffe-server`` command: ``run`` the control plane, and administer it over its socket.

``run`` reads ``--config server.yaml`` if given, then applies the flags over it (flags win);
``--trust-domain`` is required when there is no file. Every other command talks to a running
server through ``--admin-socket`` and prints text or ``--output json``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path
from typing import Final

from controlplane.admin import add_admin_commands, run_admin
from controlplane.config import DEFAULT_BIND, DEFAULT_DATA_DIR, ServerConfig
from spiffeops.config import ConfigError, load_config, parse_config
from spiffeops.logs import configure_logging

DEFAULT_ADMIN_SOCKET: Final = str(DEFAULT_DATA_DIR / "admin" / "admin.sock")

DESCRIPTION = """\
spiffe-server: the spiffe-sidecar control plane. It signs X.509- and JWT-SVIDs, stores
registration entries, attests node agents and serves the agent and registration APIs.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spiffe-server", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('spiffe-sidecar')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the server", description="Run the control plane until SIGTERM.")
    run.add_argument("--config", type=Path, metavar="FILE", help="server.yaml (flags override its values)")
    run.add_argument("--trust-domain", metavar="TD", help="the trust domain, e.g. example.org")
    run.add_argument(
        "--data-dir", type=Path, metavar="DIR", help=f"where the CA and SQLite live (default {DEFAULT_DATA_DIR})"
    )
    run.add_argument("--bind", metavar="HOST:PORT", help=f"the agent API's address (default {DEFAULT_BIND})")
    run.add_argument(
        "--admin-socket", type=Path, metavar="PATH", help="the admin socket (default <data-dir>/admin/admin.sock)"
    )
    run.add_argument("--database-url", metavar="URL", help="postgresql+psycopg://... (default: SQLite in the data dir)")
    run.add_argument("--status", metavar="HOST:PORT", help="serve /healthz, /readyz and /metrics here")
    run.add_argument("--log-format", choices=("text", "json"), help="log format (default text)")
    run.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error (default info)")
    run.set_defaults(handler=_run)

    add_admin_commands(commands, default_socket=DEFAULT_ADMIN_SOCKET)
    health = commands.add_parser("healthcheck", help="exit 0 if the server at --status is ready")
    health.add_argument("--status", required=True, metavar="HOST:PORT", help="the server's status address")
    health.set_defaults(handler=_healthcheck)
    return parser


_FLAGS: Final = {
    "trust_domain": "trust_domain",
    "data_dir": "data_dir",
    "bind": "bind",
    "admin_socket": "admin_socket",
    "database_url": "database_url",
    "status": "status",
    "log_format": "log_format",
    "log_level": "log_level",
}


def load_server_config(args: argparse.Namespace) -> ServerConfig:
    overrides = {key: getattr(args, flag) for flag, key in _FLAGS.items() if getattr(args, flag) is not None}
    if args.config is not None:
        return load_config(args.config, ServerConfig, overrides=overrides)
    if "trust_domain" not in overrides:
        raise ConfigError("config: --trust-domain is required when no --config file is given")
    return parse_config("{}", ServerConfig, source="command line", overrides=overrides)


def _run(args: argparse.Namespace) -> int:
    from controlplane.app import Server  # noqa: PLC0415 - only `run` needs the server's parts

    try:
        config = load_server_config(args)
    except ConfigError as err:
        print(f"spiffe-server: {err}", file=sys.stderr)
        return 2
    configure_logging(fmt=config.log_format, level=config.log_level)
    server = Server(config)
    try:
        asyncio.run(server.run(announce=lambda line: print(line, flush=True)))
    except KeyboardInterrupt:
        return 130
    except Exception:  # the composition root: anything that escapes is logged, then the process fails
        logging.getLogger("spiffe-server").exception("spiffe-server failed")
        return 1
    return 0


def _healthcheck(args: argparse.Namespace) -> int:
    try:
        with urllib.request.urlopen(f"http://{args.status}/readyz", timeout=5) as response:
            ready = response.status == 200
    except (urllib.error.URLError, OSError) as err:
        print(f"spiffe-server: not ready ({err})", file=sys.stderr)
        return 1
    print("ready" if ready else "not ready")
    return 0 if ready else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is not None:
        return int(handler(args))
    return run_admin(args)


if __name__ == "__main__":
    sys.exit(main())
