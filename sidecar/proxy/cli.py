"""The ``spiffe-proxy`` command line: flags to a :class:`~sidecar.proxy.app.ProxyConfig`, then run.

The console script is :func:`sidecar.proxy_cli.main`, which hands :func:`main` the Workload API
source (the proxy itself may not import the gRPC client). Exit codes: 0 after a graceful drain,
2 for bad flags or configuration, 1 when the proxy cannot start or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import TextIO

import uvloop

from sidecar.proxy.address import Address
from sidecar.proxy.app import OpenWorkloadSource, ProxyApp, ProxyConfig
from sidecar.proxy.errors import ProxyConfigError
from sidecar.proxy.policy import POLICY_AND_FLAGS, Policy
from sidecar.proxy.policyfile import load_policy_file
from sidecar.proxy.relay import Timeouts
from sidecar.proxy.workers import Supervisor, WorkerFields, die_with_parent
from spiffecore import SpiffeError
from spiffeops.logs import configure_logging
from spiffeops.status import AddressError, parse_host_port

DESCRIPTION = """\
spiffe-proxy: an mTLS TCP proxy that puts SPIFFE identities and authorization by SPIFFE ID in
front of services that know nothing of SPIFFE (server mode: TLS in, plaintext to --upstream),
or lets them call SPIFFE services (client mode: plaintext in, mTLS to --upstream), with
certificates rotating under live traffic.

The identity comes from the Workload API (--workload-api, or SPIFFE_ENDPOINT_SOCKET) or from
PEM files (--cert, --key, --bundle; re-read when they change and on SIGHUP). At least one
--allow-* rule is required, or a --policy file instead (re-read when it changes and on SIGHUP;
new connections follow it, open ones keep going). A policy file:

  version: 1
  listeners:
    - listen: 0.0.0.0:8443          # this proxy's --listen
      allow:
        ids: [spiffe://example.org/frontend]
        trust_domains: [partner.example]
        patterns: ["spiffe://example.org/ns/*/sa/**"]
  default:                          # optional: any other --listen
    allow:
      any_id: true

--workers N runs N processes accepting on the same TCP port (SO_REUSEPORT), one core each.
Prints one line when ready; SIGTERM or SIGINT drains and exits 0. Exit codes: 0 after a drain,
2 for a bad flag, configuration or policy file, 1 when it cannot start.
"""

ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"

_log = logging.getLogger("spiffe-proxy")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative: {text!r}")
    return value


def _workers(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spiffe-proxy", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('spiffe-sidecar')}")
    parser.add_argument("--listen", required=True, metavar="ADDR", help="host:port, [v6]:port or unix:/path")
    parser.add_argument("--upstream", required=True, metavar="ADDR", help="host:port, [v6]:port or unix:/path")
    parser.add_argument("--mode", choices=("server", "client"), default="server", help="default: server")
    identity = parser.add_argument_group("identity (one source)")
    identity.add_argument("--workload-api", metavar="URI", help=f"Workload API address (default: ${ENDPOINT_ENV})")
    identity.add_argument("--cert", type=Path, metavar="FILE", help="PEM certificate chain, leaf first")
    identity.add_argument("--key", type=Path, metavar="FILE", help="PEM private key")
    identity.add_argument("--bundle", type=Path, metavar="FILE", help="PEM roots of the trust domain")
    allow = parser.add_argument_group("authorization of the peer's SPIFFE ID (OR-ed, repeatable)")
    allow.add_argument("--allow-id", action="append", default=[], metavar="ID")
    allow.add_argument("--allow-trust-domain", action="append", default=[], metavar="TD")
    allow.add_argument("--allow-pattern", action="append", default=[], metavar="P", help="* one segment, ** at end")
    allow.add_argument("--allow-any-id", action="store_true", help="any ID of a trusted domain (explicit, alone)")
    allow.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="YAML rules per listener, re-read on change and SIGHUP (instead of --allow-*)",
    )
    ops = parser.add_argument_group("operation")
    ops.add_argument("--status", metavar="HOST:PORT", help="serve /healthz, /readyz and /metrics")
    ops.add_argument("--max-conns", type=_count, default=0, metavar="N", help="0: no limit (default)")
    ops.add_argument(
        "--workers", type=_workers, default=1, metavar="N", help="processes sharing the TCP port (default: 1)"
    )
    ops.add_argument("--proxy-protocol", action="store_true", help="send a PROXY v2 header to the upstream")
    ops.add_argument("--handshake-timeout", type=_seconds, default=10.0, metavar="S", help="default: 10")
    ops.add_argument("--connect-timeout", type=_seconds, default=10.0, metavar="S", help="default: 10")
    ops.add_argument("--idle-timeout", type=_seconds, default=None, metavar="S", help="default: none")
    ops.add_argument("--close-timeout", type=_seconds, default=60.0, metavar="S", help="default: 60")
    ops.add_argument("--drain-timeout", type=_seconds, default=30.0, metavar="S", help="default: 30")
    ops.add_argument("--unsafe-listen", action="store_true", help="allow a non-loopback plaintext listener")
    ops.add_argument("--unsafe-upstream", action="store_true", help="allow a non-loopback plaintext upstream")
    ops.add_argument("--log-format", choices=("json", "text"), default="json", help="default: json")
    ops.add_argument("--log-level", default="info", metavar="L", help="default: info")
    # A worker of --workers N: set by its parent (sidecar.proxy.workers), never by hand.
    parser.add_argument("--worker", type=_count, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-port", type=_count, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-parent", type=_count, default=0, help=argparse.SUPPRESS)
    return parser


def load_config(args: argparse.Namespace, environ: os._Environ[str] | dict[str, str]) -> ProxyConfig:
    """The checked configuration; :class:`ProxyConfigError` for anything malformed or unsafe."""
    status = None
    if args.status is not None:
        try:
            status = parse_host_port(args.status)
        except AddressError as err:
            raise ProxyConfigError(f"bad --status address ({err})", args.status) from err
    workload_api = args.workload_api
    if workload_api is None and args.cert is None and args.key is None and args.bundle is None:
        workload_api = environ.get(ENDPOINT_ENV)
    try:
        timeouts = Timeouts(
            handshake=args.handshake_timeout,
            connect=args.connect_timeout,
            idle=args.idle_timeout,
            close=args.close_timeout,
        )
    except ValueError as err:
        raise ProxyConfigError(str(err)) from err
    listen = Address.parse(args.listen)
    flags = bool(args.allow_id or args.allow_trust_domain or args.allow_pattern or args.allow_any_id)
    if args.policy is not None:
        if flags:
            raise ProxyConfigError(POLICY_AND_FLAGS)
        policy = load_policy_file(args.policy).for_listener(listen)
    else:
        policy = Policy.from_rules(
            allow_id=args.allow_id,
            allow_trust_domain=args.allow_trust_domain,
            allow_pattern=args.allow_pattern,
            allow_any_id=args.allow_any_id,
        )
    if args.worker is not None:
        if not args.worker_port or not args.worker_parent:
            raise ProxyConfigError("--worker is for the processes spiffe-proxy --workers starts, not for use by hand")
        status = None  # the parent serves it
    return ProxyConfig(
        mode=args.mode,
        listen=listen,
        upstream=Address.parse(args.upstream),
        policy=policy,
        policy_file=args.policy,
        workers=args.workers,
        worker=args.worker,
        worker_port=args.worker_port,
        workload_api=workload_api,
        cert=args.cert,
        key=args.key,
        bundle=args.bundle,
        status=status,
        max_connections=args.max_conns,
        proxy_protocol=args.proxy_protocol,
        timeouts=timeouts,
        drain_timeout=args.drain_timeout,
        unsafe_listen=args.unsafe_listen,
        unsafe_upstream=args.unsafe_upstream,
    )


def main(
    argv: Sequence[str] | None = None,
    *,
    open_workload_source: OpenWorkloadSource | None = None,
    out: TextIO | None = None,
    worker_command: Sequence[str] | None = None,
) -> int:
    """Run the proxy; the exit code. ``worker_command`` starts this command in a new interpreter,
    for ``--workers`` (without it, ``--workers`` above 1 is refused)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    stdout = out if out is not None else sys.stdout
    try:
        handler = configure_logging(fmt=args.log_format, level=args.log_level)
    except ValueError as err:
        print(f"spiffe-proxy: error: {err}", file=sys.stderr)
        return 2
    if args.worker is not None:
        handler.addFilter(WorkerFields(args.worker))

    def announce(line: str) -> None:
        print(line, file=stdout, flush=True)

    try:
        config = load_config(args, os.environ)
        if config.worker is not None:
            die_with_parent(args.worker_parent)
        if config.workers > 1 and config.worker is None:
            if worker_command is None:
                raise ProxyConfigError("--workers above 1 needs the spiffe-proxy command to start its workers")
            supervisor = Supervisor(config, command=worker_command, argv=arguments)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(supervisor.run(announce))
        app = ProxyApp(config, open_workload_source=open_workload_source)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(app.run(announce))
    except ProxyConfigError as err:
        print(f"spiffe-proxy: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except SpiffeError as err:  # no identity at start-up, an unreachable Workload API, ...
        _log.error("spiffe-proxy cannot start", extra={"reason": str(err)})
        return 1
    except OSError as err:  # the listen address is taken, ...
        _log.error("spiffe-proxy cannot start", extra={"reason": str(err)})
        return 1
    except Exception:  # the composition root: anything else is logged, then the process fails
        logging.getLogger("spiffe-proxy").exception("spiffe-proxy failed")
        return 1
    return 0
