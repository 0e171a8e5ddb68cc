"""The administrators' commands: ``spiffe-server entry|token|bundle|agent|federation ...`` over the admin socket.

Each command is a function of parsed arguments that talks to the registration API over the
server's unix socket and prints either readable text (tables) or JSON (``--output json``, one
document per command, for scripts). Errors from the server are printed as the server phrased them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

import grpc

from controlplane.api.convert import bundle_from_proto, bundle_to_proto, entry_to_proto
from controlplane.federation.relationship import parse_trust_domain
from controlplane.model import ModelError, RegistrationEntry, Selector, parse_spiffe_id
from spiffecore import JWTBundle, SpiffeBundle, SpiffeError, TrustDomain, X509Bundle
from spiffecore.der import dump_pem_certificates
from spiffeproto import registration_pb2, registration_pb2_grpc, types_pb2

DEFAULT_TIMEOUT: Final = 30.0


class AdminError(Exception):
    """A command failed; the message is what the user is told."""


def add_connection_arguments(parser: argparse.ArgumentParser, *, default_socket: str) -> None:
    parser.add_argument(
        "--admin-socket",
        default=default_socket,
        metavar="PATH",
        help=f"the server's admin socket (default {default_socket})",
    )
    parser.add_argument("--output", choices=("text", "json"), default="text", help="text tables or JSON (default text)")


def _channel(args: argparse.Namespace) -> grpc.Channel:
    return grpc.insecure_channel(f"unix:{args.admin_socket}")


def _call(args: argparse.Namespace, method: Callable[[registration_pb2_grpc.RegistrationAPIStub], Any]) -> Any:
    with _channel(args) as channel:
        stub = registration_pb2_grpc.RegistrationAPIStub(channel)
        try:
            return method(stub)
        except grpc.RpcError as err:
            # Errors raised by a call are also grpc.Call objects; the stubs do not say so.
            code = err.code() if hasattr(err, "code") else None
            details = err.details() if hasattr(err, "details") else str(err)
            if code == grpc.StatusCode.UNAVAILABLE:
                raise AdminError(
                    f"cannot reach the server's admin socket {args.admin_socket!r} (is spiffe-server running?)"
                ) from err
            raise AdminError(details or str(code)) from err


def _time(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat() if seconds else ""


def entry_document(message: types_pb2.Entry) -> dict[str, Any]:
    return {
        "id": message.id,
        "spiffe_id": message.spiffe_id,
        "parent_id": message.parent_id,
        "selectors": [f"{s.type}:{s.value}" for s in message.selectors],
        "x509_svid_ttl": message.x509_svid_ttl,
        "jwt_svid_ttl": message.jwt_svid_ttl,
        "dns_names": list(message.dns_names),
        "federates_with": list(message.federates_with),
        "admin": message.admin,
        "downstream": message.downstream,
        "hint": message.hint,
        "expires_at": _time(message.expires_at) or None,
        "revision": message.revision,
        "created_at": _time(message.created_at) or None,
    }


def agent_document(message: types_pb2.Agent) -> dict[str, Any]:
    return {
        "spiffe_id": message.spiffe_id,
        "attestation_type": message.attestation_type,
        "serial": message.serial,
        "expires_at": _time(message.expires_at),
        "selectors": [f"{s.type}:{s.value}" for s in message.selectors],
        "banned": message.banned,
        "can_reattest": message.can_reattest,
    }


def table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Print rows as aligned columns; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")


def _entry_from_args(args: argparse.Namespace, *, entry_id: str = "") -> types_pb2.Entry:
    try:
        entry = RegistrationEntry(
            id=entry_id,
            spiffe_id=parse_spiffe_id(args.spiffe_id, what="--spiffe-id"),
            parent_id=parse_spiffe_id(args.parent_id, what="--parent-id"),
            selectors=tuple(Selector.parse(s) for s in args.selector),
            x509_svid_ttl=args.x509_ttl,
            jwt_svid_ttl=args.jwt_ttl,
            dns_names=tuple(args.dns_name),
            federates_with=tuple(TrustDomain.parse(td) for td in args.federates_with),
            admin=args.admin,
            downstream=args.downstream,
            hint=args.hint,
        )
    except SpiffeError as err:
        raise AdminError(str(err)) from err
    return entry_to_proto(entry)


def _print_entries(args: argparse.Namespace, entries: Iterable[types_pb2.Entry], out: TextIO) -> None:
    documents = [entry_document(e) for e in entries]
    if args.output == "json":
        json.dump(documents, out, indent=2)
        out.write("\n")
        return
    if not documents:
        out.write("no entries\n")
        return
    rows = [["ID", "SPIFFE ID", "PARENT ID", "SELECTORS", "X509 TTL", "JWT TTL", "DNS NAMES", "HINT"]]
    rows += [
        [
            d["id"],
            d["spiffe_id"],
            d["parent_id"],
            ",".join(d["selectors"]),
            str(d["x509_svid_ttl"] or "default"),
            str(d["jwt_svid_ttl"] or "default"),
            ",".join(d["dns_names"]),
            d["hint"],
        ]
        for d in documents
    ]
    table(rows, out)


def entry_create(args: argparse.Namespace, out: TextIO) -> None:
    request = registration_pb2.CreateEntryRequest(entry=_entry_from_args(args))
    created = _call(args, lambda stub: stub.CreateEntry(request, timeout=DEFAULT_TIMEOUT))
    if args.output == "json":
        json.dump(entry_document(created), out, indent=2)
        out.write("\n")
    else:
        out.write(created.id + "\n")


def entry_update(args: argparse.Namespace, out: TextIO) -> None:
    request = registration_pb2.UpdateEntryRequest(entry=_entry_from_args(args, entry_id=args.entry_id))
    updated = _call(args, lambda stub: stub.UpdateEntry(request, timeout=DEFAULT_TIMEOUT))
    _print_entries(args, [updated], out)


def entry_delete(args: argparse.Namespace, out: TextIO) -> None:
    request = registration_pb2.DeleteEntryRequest(id=args.entry_id)
    deleted = _call(args, lambda stub: stub.DeleteEntry(request, timeout=DEFAULT_TIMEOUT))
    if args.output == "json":
        json.dump(entry_document(deleted), out, indent=2)
        out.write("\n")
    else:
        out.write(f"deleted {deleted.id}\n")


def entry_show(args: argparse.Namespace, out: TextIO) -> None:
    request = registration_pb2.ListEntriesRequest(spiffe_id=args.spiffe_id or "", parent_id=args.parent_id or "")
    if args.selector:
        try:
            selector = Selector.parse(args.selector)
        except ModelError as err:
            raise AdminError(str(err)) from err
        request.selector.CopyFrom(types_pb2.Selector(type=selector.type, value=selector.value))
    entries = _call(args, lambda stub: list(stub.ListEntries(request, timeout=DEFAULT_TIMEOUT)))
    _print_entries(args, entries, out)


def entry_count(args: argparse.Namespace, out: TextIO) -> None:
    response = _call(
        args, lambda stub: stub.CountEntries(registration_pb2.CountEntriesRequest(), timeout=DEFAULT_TIMEOUT)
    )
    if args.output == "json":
        json.dump({"count": response.count}, out)
        out.write("\n")
    else:
        out.write(f"{response.count}\n")


def token_generate(args: argparse.Namespace, out: TextIO) -> None:
    request = registration_pb2.CreateJoinTokenRequest(ttl=args.ttl, alias=args.spiffe_id or "")
    response = _call(args, lambda stub: stub.CreateJoinToken(request, timeout=DEFAULT_TIMEOUT))
    if args.output == "json":
        json.dump({"token": response.token, "expires_at": _time(response.expires_at)}, out)
        out.write("\n")
    else:
        out.write(response.token + "\n")


def bundle_show(args: argparse.Namespace, out: TextIO) -> None:
    message = _call(args, lambda stub: stub.GetBundle(registration_pb2.GetBundleRequest(), timeout=DEFAULT_TIMEOUT))
    if args.format == "spiffe" or args.output == "json":
        document = json.loads(message.spiffe_bundle)
        json.dump(document, out, indent=2)
        out.write("\n")
        return
    try:
        bundle = bundle_from_proto(message)
    except SpiffeError as err:
        raise AdminError(f"the server sent a bundle that does not parse: {err}") from err
    out.write(dump_pem_certificates(bundle.x509.authorities).decode("ascii"))


def agent_list(args: argparse.Namespace, out: TextIO) -> None:
    agents = _call(
        args, lambda stub: list(stub.ListAgents(registration_pb2.ListAgentsRequest(), timeout=DEFAULT_TIMEOUT))
    )
    documents = [agent_document(a) for a in agents]
    if args.output == "json":
        json.dump(documents, out, indent=2)
        out.write("\n")
        return
    if not documents:
        out.write("no agents\n")
        return
    rows = [["SPIFFE ID", "ATTESTATION", "SVID EXPIRES", "SERIAL", "BANNED"]]
    rows += [
        [d["spiffe_id"], d["attestation_type"], d["expires_at"], d["serial"], "yes" if d["banned"] else "no"]
        for d in documents
    ]
    table(rows, out)


def _agent_action(
    name: str,
) -> Callable[[argparse.Namespace, TextIO], None]:
    def run(args: argparse.Namespace, out: TextIO) -> None:
        request = registration_pb2.AgentRequest(spiffe_id=args.agent_id)
        agent = _call(args, lambda stub: getattr(stub, name)(request, timeout=DEFAULT_TIMEOUT))
        document = agent_document(agent)
        if args.output == "json":
            json.dump(document, out, indent=2)
            out.write("\n")
            return
        for key, value in document.items():
            shown = ",".join(value) if isinstance(value, list) else str(value)
            out.write(f"{key:<17} {shown}\n")

    return run


agent_show = _agent_action("GetAgent")
agent_evict = _agent_action("EvictAgent")
agent_ban = _agent_action("BanAgent")


def federation_document(message: types_pb2.FederationRelationship) -> dict[str, Any]:
    bundle: Any = None
    if message.HasField("trust_domain_bundle"):
        bundle = json.loads(message.trust_domain_bundle.spiffe_bundle)
    return {
        "trust_domain": message.trust_domain,
        "bundle_endpoint_url": message.bundle_endpoint_url,
        "bundle_endpoint_profile": message.bundle_endpoint_profile,
        "endpoint_spiffe_id": message.endpoint_spiffe_id or None,
        "created_at": _time(message.created_at) or None,
        "refreshed_at": _time(message.refreshed_at) or None,
        "last_attempt_at": _time(message.last_attempt_at) or None,
        "last_error": message.last_error,
        "trust_domain_bundle": bundle,
    }


def _bundle_summary(document: Any) -> tuple[str, str, str]:
    """Sequence, X.509 and JWT authority counts of a bundle document, as shown in text."""
    if document is None:
        return ("", "0", "0")
    keys = document.get("keys", [])
    x509_count = sum(1 for key in keys if key.get("use") == "x509-svid")
    jwt_count = sum(1 for key in keys if key.get("use") == "jwt-svid")
    return (str(document.get("spiffe_sequence", "")), str(x509_count), str(jwt_count))


def _print_federation(args: argparse.Namespace, message: types_pb2.FederationRelationship, out: TextIO) -> None:
    document = federation_document(message)
    if args.output == "json":
        json.dump(document, out, indent=2)
        out.write("\n")
        return
    sequence, x509_count, jwt_count = _bundle_summary(document["trust_domain_bundle"])
    shown = {key: value for key, value in document.items() if key != "trust_domain_bundle"}
    shown |= {"bundle_sequence": sequence, "x509_authorities": x509_count, "jwt_authorities": jwt_count}
    for key, value in shown.items():
        out.write(f"{key:<24} {'' if value is None else value}".rstrip() + "\n")


def _read_bundle(path: Path, trust_domain: TrustDomain, form: str) -> SpiffeBundle:
    """The foreign trust domain's bundle from a file: PEM roots (``bundle show``) or SPIFFE JSON."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AdminError(f"cannot read the trust domain bundle {str(path)!r} ({err.strerror})") from err
    try:
        if form == "spiffe":
            return SpiffeBundle.parse(trust_domain, data)
        return SpiffeBundle(x509=X509Bundle.load_pem(trust_domain, data), jwt=JWTBundle(trust_domain=trust_domain))
    except SpiffeError as err:
        raise AdminError(f"the trust domain bundle {str(path)!r} is not a {form} bundle ({err})") from err


def federation_create(args: argparse.Namespace, out: TextIO) -> None:
    try:
        trust_domain = parse_trust_domain(args.trust_domain, what="--trust-domain")
    except SpiffeError as err:
        raise AdminError(str(err)) from err
    relationship = types_pb2.FederationRelationship(
        trust_domain=trust_domain.name,
        bundle_endpoint_url=args.bundle_endpoint_url,
        bundle_endpoint_profile=args.bundle_endpoint_profile,
        endpoint_spiffe_id=args.endpoint_spiffe_id or "",
    )
    if args.trust_domain_bundle is not None:
        bundle = _read_bundle(args.trust_domain_bundle, trust_domain, args.trust_domain_bundle_format)
        relationship.trust_domain_bundle.CopyFrom(bundle_to_proto(bundle))
    request = registration_pb2.CreateFederationRelationshipRequest(relationship=relationship)
    created = _call(args, lambda stub: stub.CreateFederationRelationship(request, timeout=DEFAULT_TIMEOUT))
    _print_federation(args, created, out)


def federation_list(args: argparse.Namespace, out: TextIO) -> None:
    request = registration_pb2.ListFederationRelationshipsRequest()
    found = _call(args, lambda stub: list(stub.ListFederationRelationships(request, timeout=DEFAULT_TIMEOUT)))
    documents = [federation_document(message) for message in found]
    if args.output == "json":
        json.dump(documents, out, indent=2)
        out.write("\n")
        return
    if not documents:
        out.write("no federation relationships\n")
        return
    rows = [["TRUST DOMAIN", "BUNDLE ENDPOINT URL", "PROFILE", "ENDPOINT SPIFFE ID", "REFRESHED", "SEQUENCE", "ERROR"]]
    rows += [
        [
            d["trust_domain"],
            d["bundle_endpoint_url"],
            d["bundle_endpoint_profile"],
            d["endpoint_spiffe_id"] or "",
            d["refreshed_at"] or "never",
            _bundle_summary(d["trust_domain_bundle"])[0],
            d["last_error"],
        ]
        for d in documents
    ]
    table(rows, out)


def _federation_action(name: str) -> Callable[[argparse.Namespace, TextIO], None]:
    def run(args: argparse.Namespace, out: TextIO) -> None:
        request = registration_pb2.FederationRelationshipRequest(trust_domain=args.trust_domain)
        message = _call(args, lambda stub: getattr(stub, name)(request, timeout=DEFAULT_TIMEOUT))
        _print_federation(args, message, out)

    return run


federation_show = _federation_action("GetFederationRelationship")
federation_delete = _federation_action("DeleteFederationRelationship")
federation_refresh = _federation_action("RefreshFederatedBundle")


def add_admin_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser], *, default_socket: str) -> None:
    """Add ``entry``, ``token``, ``bundle``, ``agent`` and ``federation`` with their subcommands."""

    def leaf(
        group: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        help_text: str,
        run: Callable[[argparse.Namespace, TextIO], None],
    ) -> argparse.ArgumentParser:
        parser = group.add_parser(name, help=help_text, description=help_text)
        add_connection_arguments(parser, default_socket=default_socket)
        parser.set_defaults(run=run)
        return parser

    def entry_fields(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--spiffe-id", required=True, metavar="ID", help="the SPIFFE ID workloads get")
        parser.add_argument(
            "--parent-id", required=True, metavar="ID", help="the agent (or alias) the workloads run under"
        )
        parser.add_argument(
            "--selector",
            action="append",
            required=True,
            metavar="TYPE:VALUE",
            help="a selector the workload must match (repeat for several; all must match)",
        )
        parser.add_argument(
            "--x509-ttl", type=int, default=0, metavar="SECONDS", help="X.509-SVID TTL (default: server's)"
        )
        parser.add_argument(
            "--jwt-ttl", type=int, default=0, metavar="SECONDS", help="JWT-SVID TTL (default: server's)"
        )
        parser.add_argument("--dns-name", action="append", default=[], metavar="NAME", help="a DNS SAN (repeatable)")
        parser.add_argument(
            "--federates-with",
            action="append",
            default=[],
            metavar="TD",
            help="a trust domain whose bundle the workloads receive (repeatable)",
        )
        parser.add_argument("--hint", default="", help="a hint for workloads that hold several SVIDs")
        parser.add_argument("--admin", action="store_true", help="workloads may use the registration API")
        parser.add_argument("--downstream", action="store_true", help="workloads get a downstream CA")

    entry = commands.add_parser("entry", help="manage registration entries").add_subparsers(
        dest="action", required=True
    )
    entry_fields(leaf(entry, "create", "create an entry; prints its id", entry_create))
    update = leaf(entry, "update", "replace every field of an entry", entry_update)
    update.add_argument("entry_id", metavar="ENTRY_ID")
    entry_fields(update)
    leaf(entry, "delete", "delete an entry", entry_delete).add_argument("entry_id", metavar="ENTRY_ID")
    show = leaf(entry, "show", "list entries, filtered", entry_show)
    show.add_argument("--spiffe-id", metavar="ID", help="only entries with this SPIFFE ID")
    show.add_argument("--parent-id", metavar="ID", help="only entries under this parent")
    show.add_argument("--selector", metavar="TYPE:VALUE", help="only entries with this selector")
    leaf(entry, "count", "print the number of entries", entry_count)

    token = commands.add_parser("token", help="join tokens").add_subparsers(dest="action", required=True)
    generate = leaf(token, "generate", "print a new single-use join token", token_generate)
    generate.add_argument("--spiffe-id", metavar="ID", help="an alias ID for the agent that attests with the token")
    generate.add_argument(
        "--ttl", type=int, default=600, metavar="SECONDS", help="how long the token is valid (default 600)"
    )

    bundle = commands.add_parser("bundle", help="the trust bundle").add_subparsers(dest="action", required=True)
    show_bundle = leaf(bundle, "show", "print the trust bundle", bundle_show)
    show_bundle.add_argument(
        "--format", choices=("pem", "spiffe"), default="pem", help="PEM roots or the SPIFFE bundle JSON (default pem)"
    )

    agent = commands.add_parser("agent", help="attested agents").add_subparsers(dest="action", required=True)
    leaf(agent, "list", "list attested agents", agent_list)
    for name, help_text, run in (
        ("show", "show one agent", agent_show),
        ("evict", "delete an agent: it must attest again", agent_evict),
        ("ban", "refuse an agent until it is evicted", agent_ban),
    ):
        leaf(agent, name, help_text, run).add_argument("agent_id", metavar="ID")

    federation = commands.add_parser("federation", help="relationships with other trust domains").add_subparsers(
        dest="action", required=True
    )
    create = leaf(federation, "create", "federate with another trust domain", federation_create)
    create.add_argument("--trust-domain", required=True, metavar="TD", help="the other trust domain")
    create.add_argument(
        "--bundle-endpoint-url", required=True, metavar="URL", help="its bundle endpoint, https://host:port/"
    )
    create.add_argument(
        "--bundle-endpoint-profile",
        required=True,
        choices=("https_spiffe", "https_web"),
        help="https_spiffe: the endpoint presents an SVID; https_web: a web PKI certificate",
    )
    create.add_argument(
        "--endpoint-spiffe-id", metavar="ID", help="https_spiffe: the endpoint's SPIFFE ID (spiffe://TD/spire/server)"
    )
    create.add_argument(
        "--trust-domain-bundle",
        type=Path,
        metavar="FILE",
        help="the other trust domain's bundle (its `bundle show` output); required for https_spiffe",
    )
    create.add_argument(
        "--trust-domain-bundle-format",
        choices=("pem", "spiffe"),
        default="pem",
        help="PEM roots or the SPIFFE bundle JSON (default pem)",
    )
    leaf(federation, "list", "list the relationships", federation_list)
    for name, help_text, run in (
        ("show", "show one relationship and its bundle", federation_show),
        ("delete", "stop federating: agents drop the trust domain's bundle", federation_delete),
        ("refresh", "fetch the trust domain's bundle now", federation_refresh),
    ):
        leaf(federation, name, help_text, run).add_argument(
            "--trust-domain", required=True, metavar="TD", help="the other trust domain"
        )


def run_admin(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        args.run(args, out)
    except AdminError as error:
        err.write(f"spiffe-server: {error}\n")
        return 1
    return 0
