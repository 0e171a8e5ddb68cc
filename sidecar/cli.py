"""The ``spiffe-agent`` command: ``run`` the node agent, and talk to a Workload API as a workload.

``run`` reads ``--config agent.yaml`` if given, then applies the flags over it. The ``api``
commands and ``healthcheck`` are workloads themselves: they call the Workload API at ``--socket``
(``unix:///path``, ``unix:/path`` or a path), else ``SPIFFE_ENDPOINT_SOCKET``, else the default
socket, and print text or ``--output json``. ``helper`` is a workload too: it keeps the SVIDs as
files for applications that read files (:mod:`sidecar.helper`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final, TextIO

from sidecar.agent.config import DEFAULT_DATA_DIR, DEFAULT_ISTIO_SOCKET, DEFAULT_SERVER, DEFAULT_SOCKET, AgentConfig
from sidecar.helper.config import HelperConfig, split_command
from sidecar.helper.files import write_x509_files
from sidecar.workload.client import WorkloadAPIClient, WorkloadAPIError
from sidecar.workload.endpoint import EndpointError
from sidecar.workload.identities import X509Context
from spiffecore import SpiffeError, SpiffeID, SpiffeIDError
from spiffeops.config import ConfigError, load_config, parse_config
from spiffeops.logs import configure_logging

HEALTHCHECK_TIMEOUT: Final = 5.0

DESCRIPTION = """\
spiffe-agent: the spiffe-sidecar node agent. It attests its node to the control plane, keeps
the SVIDs of the node's workloads fresh, and serves the SPIFFE Workload API on one unix socket,
identifying each caller by its process.
"""


class CommandError(Exception):
    """A command failed; the message is what the user is told."""


def _add_socket(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="the Workload API: unix:///path, unix:/path or a path "
        f"(default: $SPIFFE_ENDPOINT_SOCKET, then {DEFAULT_SOCKET})",
    )


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", choices=("text", "json"), default="text", help="text or JSON (default text)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spiffe-agent", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('spiffe-sidecar')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the node agent", description="Run the node agent until SIGTERM.")
    run.add_argument("--config", type=Path, metavar="FILE", help="agent.yaml (flags override its values)")
    run.add_argument("--server", metavar="HOST:PORT", help=f"the control plane's agent API (default {DEFAULT_SERVER})")
    run.add_argument("--trust-domain", metavar="TD", help="the trust domain, e.g. example.org")
    trust = run.add_mutually_exclusive_group()
    trust.add_argument("--trust-bundle", type=Path, metavar="FILE", help="PEM roots to trust the server with")
    trust.add_argument(
        "--insecure-bootstrap",
        action="store_true",
        default=None,
        help="trust the server's root on first contact (logged loudly; use a bundle file in production)",
    )
    run.add_argument("--join-token", metavar="TOKEN", help="a join token from 'spiffe-server token generate'")
    run.add_argument(
        "--k8s-psat-cluster", metavar="NAME", help="attest with the pod's projected service account token (k8s_psat)"
    )
    run.add_argument(
        "--k8s-psat-token-path",
        type=Path,
        metavar="FILE",
        help="the projected token for k8s_psat (default /var/run/secrets/tokens/spiffe-agent)",
    )
    run.add_argument(
        "--data-dir", type=Path, metavar="DIR", help=f"where the agent keeps its identity (default {DEFAULT_DATA_DIR})"
    )
    run.add_argument("--socket", type=Path, metavar="PATH", help=f"the public socket (default {DEFAULT_SOCKET})")
    run.add_argument(
        "--istio-socket",
        type=Path,
        metavar="PATH",
        help=f"also serve Istio's proxies here, with Istio's SDS names (Istio's path: {DEFAULT_ISTIO_SOCKET})",
    )
    run.add_argument("--status", metavar="HOST:PORT", help="serve /healthz, /readyz and /metrics here")
    run.add_argument("--log-format", choices=("text", "json"), help="log format (default text)")
    run.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error (default info)")
    run.set_defaults(handler=_run)

    api = commands.add_parser("api", help="call the Workload API as a workload").add_subparsers(
        dest="api_command", required=True, metavar="ACTION"
    )
    fetch = api.add_parser("fetch", help="fetch SVIDs").add_subparsers(dest="kind", required=True, metavar="KIND")
    x509_parser = fetch.add_parser("x509", help="fetch X.509-SVIDs and bundles")
    _add_socket(x509_parser)
    _add_output(x509_parser)
    x509_parser.add_argument("--write", type=Path, metavar="DIR", help="also write svid.pem, svid_key.pem, bundle.pem")
    x509_parser.set_defaults(handler=_fetch_x509)
    jwt_parser = fetch.add_parser("jwt", help="fetch a JWT-SVID")
    _add_socket(jwt_parser)
    _add_output(jwt_parser)
    jwt_parser.add_argument("--audience", action="append", required=True, metavar="A", help="audience (repeatable)")
    jwt_parser.add_argument("--spiffe-id", metavar="ID", help="only this identity of the workload's")
    jwt_parser.set_defaults(handler=_fetch_jwt)
    validate = api.add_parser("validate", help="validate an SVID").add_subparsers(
        dest="kind", required=True, metavar="KIND"
    )
    validate_jwt = validate.add_parser("jwt", help="validate a JWT-SVID")
    _add_socket(validate_jwt)
    _add_output(validate_jwt)
    validate_jwt.add_argument("--audience", required=True, metavar="A", help="the audience you expect")
    validate_jwt.add_argument("--svid", required=True, metavar="TOKEN", help="the JWT-SVID")
    validate_jwt.set_defaults(handler=_validate_jwt)
    watch = api.add_parser("watch", help="print every X.509 update until interrupted")
    _add_socket(watch)
    _add_output(watch)
    watch.set_defaults(handler=_watch)

    _add_helper(commands)

    health = commands.add_parser("healthcheck", help="exit 0 if the agent answers on its socket")
    _add_socket(health)
    health.set_defaults(handler=_healthcheck)
    return parser


# --- run ----------------------------------------------------------------------------------------

_FLAGS: Final = (
    "server",
    "trust_domain",
    "trust_bundle",
    "insecure_bootstrap",
    "join_token",
    "data_dir",
    "socket",
    "status",
    "log_format",
    "log_level",
)


def load_agent_config(args: argparse.Namespace) -> AgentConfig:
    overrides: dict[str, object] = {name: getattr(args, name) for name in _FLAGS if getattr(args, name) is not None}
    if args.istio_socket is not None:
        overrides.update({"istio.enabled": True, "istio.socket": args.istio_socket})
    if args.k8s_psat_cluster is not None:
        overrides["k8s_psat.cluster"] = args.k8s_psat_cluster
    if args.k8s_psat_token_path is not None:
        overrides["k8s_psat.token_path"] = args.k8s_psat_token_path
    if args.config is not None:
        return load_config(args.config, AgentConfig, overrides=overrides)
    if "trust_domain" not in overrides:
        raise ConfigError("config: --trust-domain is required when no --config file is given")
    return parse_config("{}", AgentConfig, source="command line", overrides=overrides)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    from sidecar.agent.app import Agent  # noqa: PLC0415 - only `run` needs the agent's parts

    try:
        config = load_agent_config(args)
    except ConfigError as err:
        raise CommandError(str(err)) from err
    configure_logging(fmt=config.log_format, level=config.log_level)
    try:
        asyncio.run(Agent(config).run(announce=lambda line: print(line, file=out, flush=True)))
    except KeyboardInterrupt:
        return 130
    except SpiffeError as err:  # a refused attestation, an unreachable server at start-up, ...
        logging.getLogger("spiffe-agent").error("spiffe-agent cannot start: %s", err)
        return 1
    except Exception:  # the composition root: anything else is logged, then the process fails
        logging.getLogger("spiffe-agent").exception("spiffe-agent failed")
        return 1
    return 0


# --- helper ---------------------------------------------------------------------------------------

HELPER_DESCRIPTION = """\
Write the workload's SVID, key and bundle as PEM files (and JWT-SVIDs, if configured) into
--cert-dir, each replaced atomically with its mode set on every write, and keep them current.
After every update: signal the process in --pid-file with --signal, or start, signal
(--renew-signal) or restart --cmd. With --once: write the files and exit.
"""


def _add_helper(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    helper = commands.add_parser(
        "helper",
        help="write SVIDs to files for applications that read files",
        description=HELPER_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    helper.add_argument("--config", type=Path, metavar="FILE", help="helper.yaml (flags override its values)")
    _add_socket(helper)
    helper.add_argument("--cert-dir", type=Path, metavar="DIR", help="where the files go (must exist)")
    helper.add_argument("--signal", metavar="SIG", help="the signal for --pid-file's process, e.g. SIGHUP")
    helper.add_argument("--pid-file", type=Path, metavar="FILE", help="signal the process whose pid is in FILE")
    helper.add_argument("--cmd", metavar="CMD", help="run CMD (split like a shell: \"nginx -g 'daemon off;'\")")
    helper.add_argument("--renew-signal", metavar="SIG", help="signal --cmd on updates instead of restarting it")
    helper.add_argument("--once", action="store_true", default=None, help="write the files once and exit")
    helper.add_argument("--health", metavar="HOST:PORT", help="serve /healthz and /readyz here")
    helper.add_argument("--log-format", choices=("text", "json"), help="log format (default text)")
    helper.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error (default info)")
    helper.set_defaults(handler=_helper)


_HELPER_FLAGS: Final = (
    "socket",
    "cert_dir",
    "signal",
    "pid_file",
    "renew_signal",
    "once",
    "health",
    "log_format",
    "log_level",
)


def load_helper_config(args: argparse.Namespace) -> HelperConfig:
    overrides: dict[str, object] = {
        name: getattr(args, name) for name in _HELPER_FLAGS if getattr(args, name) is not None
    }
    if args.cmd is not None:
        try:
            overrides["cmd"], overrides["cmd_args"] = split_command(args.cmd)
        except ValueError as err:
            raise ConfigError(f"config: {err}") from err
    if args.config is not None:
        return load_config(args.config, HelperConfig, overrides=overrides)
    if "cert_dir" not in overrides:
        raise ConfigError("config: --cert-dir is required when no --config file is given")
    return parse_config("{}", HelperConfig, source="command line", overrides=overrides)


def _helper(args: argparse.Namespace, out: TextIO) -> int:
    from sidecar.helper.run import Helper  # noqa: PLC0415 - only `helper` needs its loop

    try:
        config = load_helper_config(args)
    except ConfigError as err:
        raise CommandError(str(err)) from err
    configure_logging(fmt=config.log_format, level=config.log_level)
    helper = Helper(config)
    try:
        if config.once:
            asyncio.run(helper.run_once())
        else:
            asyncio.run(helper.run(announce=lambda line: print(line, file=out, flush=True)))
    except KeyboardInterrupt:
        return 130
    except SpiffeError as err:  # no SVID in time, an unusable cert dir or socket address
        raise CommandError(str(err)) from err
    except OSError as err:  # the files cannot be written, the health port cannot be bound
        raise CommandError(f"helper: {err.filename or ''}: {err.strerror or err}") from err
    except Exception:  # the composition root: anything else is logged, then the process fails
        logging.getLogger("spiffe-agent").exception("spiffe-agent helper failed")
        return 1
    return 0


# --- the Workload API commands ------------------------------------------------------------------


def _client(args: argparse.Namespace) -> WorkloadAPIClient:
    try:
        return WorkloadAPIClient(args.socket)
    except EndpointError as err:
        raise CommandError(str(err)) from err


def _call(args: argparse.Namespace, work: Callable[[WorkloadAPIClient], Coroutine[Any, Any, int]]) -> int:
    async def main() -> int:
        async with _client(args) as client:
            return await work(client)

    try:
        return asyncio.run(main())
    except WorkloadAPIError as err:
        raise CommandError(str(err)) from err


def x509_document(context: X509Context) -> dict[str, Any]:
    return {
        "svids": [
            {
                "spiffe_id": str(svid.id),
                "hint": svid.hint,
                "expires_at": svid.expires_at.isoformat(),
                "serial": f"{svid.leaf.serial_number:x}",
                "cert_chain_pem": svid.cert_chain_pem().decode("ascii"),
            }
            for svid in context.svids
        ],
        "bundle": {context.bundle.trust_domain.name: context.bundle.pem().decode("ascii")},
        "federated_bundles": {td.name: bundle.pem().decode("ascii") for td, bundle in context.federated.items()},
    }


def _print_x509(context: X509Context, args: argparse.Namespace, out: TextIO) -> None:
    if args.output == "json":
        json.dump(x509_document(context), out, indent=2)
        out.write("\n")
        return
    for index, svid in enumerate(context.svids):
        out.write(f"SVID {index}: {svid.id}\n")
        if svid.hint:
            out.write(f"  hint:       {svid.hint}\n")
        out.write(f"  expires:    {svid.expires_at.isoformat()} ({_remaining(svid.expires_at)})\n")
        out.write(f"  serial:     {svid.leaf.serial_number:x}\n")
    domains = [context.bundle.trust_domain.name, *(td.name for td in context.federated)]
    out.write(f"bundles: {', '.join(domains)}\n")


def _remaining(moment: datetime) -> str:
    seconds = int((moment - datetime.now(UTC)).total_seconds())
    return f"in {seconds // 60}m{seconds % 60:02d}s" if seconds >= 0 else "expired"


def _fetch_x509(args: argparse.Namespace, out: TextIO) -> int:
    async def work(client: WorkloadAPIClient) -> int:
        context = await client.fetch_x509_context()
        _print_x509(context, args, out)
        if args.write is not None:
            for path in write_x509_files(args.write, context):
                print(f"wrote {path}", file=sys.stderr)
        return 0

    return _call(args, work)


def _fetch_jwt(args: argparse.Namespace, out: TextIO) -> int:
    try:
        spiffe_id = SpiffeID.parse(args.spiffe_id) if args.spiffe_id else None
    except SpiffeIDError as err:
        raise CommandError(f"--spiffe-id: {err}") from err

    async def work(client: WorkloadAPIClient) -> int:
        svids = await client.fetch_jwt_svids(tuple(args.audience), spiffe_id)
        if args.output == "json":
            documents = [
                {"spiffe_id": str(s.id), "token": s.token, "expires_at": s.expiry.isoformat(), "hint": s.hint}
                for s in svids
            ]
            json.dump(documents, out, indent=2)
            out.write("\n")
        else:
            for svid in svids:
                out.write(f"{svid.token}\n")
        return 0

    return _call(args, work)


def _validate_jwt(args: argparse.Namespace, out: TextIO) -> int:
    async def work(client: WorkloadAPIClient) -> int:
        svid = await client.validate_jwt_svid(args.svid, args.audience)
        if args.output == "json":
            json.dump({"spiffe_id": str(svid.id), "claims": dict(svid.claims)}, out, indent=2)
            out.write("\n")
        else:
            out.write(f"valid: {svid.id}\n")
        return 0

    return _call(args, work)


def _watch(args: argparse.Namespace, out: TextIO) -> int:
    async def work(client: WorkloadAPIClient) -> int:
        async for context in client.watch_x509_context():
            if args.output == "json":
                out.write(json.dumps(x509_document(context)) + "\n")
            else:
                out.write(f"--- update at {datetime.now(UTC).isoformat()}\n")
                _print_x509(context, args, out)
            out.flush()
        return 0

    try:
        return _call(args, work)
    except KeyboardInterrupt:
        return 130


def _healthcheck(args: argparse.Namespace, out: TextIO) -> int:
    """Healthy when the agent answers: even a refusal (no identity for this caller) is an answer."""

    async def work(client: WorkloadAPIClient) -> int:
        try:
            await asyncio.wait_for(client.fetch_x509_bundles(), HEALTHCHECK_TIMEOUT)
        except WorkloadAPIError as err:
            if err.code.name in {"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN"}:
                raise
        except TimeoutError as err:
            raise CommandError(f"the agent did not answer within {HEALTHCHECK_TIMEOUT:g}s") from err
        out.write("healthy\n")
        return 0

    return _call(args, work)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args, sys.stdout))
    except CommandError as err:
        print(f"spiffe-agent: {err}", file=sys.stderr)
        return 1 if not isinstance(err.__cause__, ConfigError) else 2


if __name__ == "__main__":
    sys.exit(main())
