"""What helper mode writes, byte for byte, and writing it.

Rendering is pure (:func:`x509_files`, :func:`jwt_svid_file`, :func:`jwt_bundle_file`): contexts
in, :class:`OutputFile` values out. :func:`write_files` writes each one with
:func:`spiffeops.lifecycle.write_atomically` (a temporary file with the final mode, fsync, rename,
fsync of the directory), so every file is replaced whole, never truncated in place, and its mode is
set on every write, whatever the file had before (spiffe-helper issue #422).

Order: the bundle, then the certificate chain, then the private key, then the combined file. A
reader that loads the key and then the certificate can therefore never pair a *new* key with an
*old* certificate (the certificate it reads after the key is at least as new). No order of two
renames can rule out the other mismatch for a reader racing the writer, which is why the helper
signals only after every file is written: reload on the signal (or the restarted command's
start), not on inotify events, or read the combined file, which is always consistent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from sidecar.workload.identities import X509Context
from spiffecore import JWTSVID, X509SVID, JWTBundle, TrustDomain
from spiffecore.der import dump_pem_certificates
from spiffeops.lifecycle import write_atomically

PUBLIC_MODE: Final = 0o644
PRIVATE_MODE: Final = 0o600


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputFile:
    """One file to write: a name inside the cert dir, its bytes and its mode."""

    name: str
    data: bytes = field(repr=False)  # may hold a private key or a token: never shown
    mode: int


@dataclass(frozen=True, slots=True, kw_only=True)
class X509Layout:
    """Names and modes of the X.509 files."""

    svid_file_name: str = "svid.pem"
    svid_key_file_name: str = "svid_key.pem"
    svid_bundle_file_name: str = "bundle.pem"
    combined_file_name: str | None = None
    include_federated_bundles: bool = False
    cert_file_mode: int = PUBLIC_MODE
    key_file_mode: int = PRIVATE_MODE


def bundle_pem(context: X509Context, *, include_federated: bool) -> bytes:
    """The roots of the SVID's trust domain, then (if asked) each federated domain's, by name."""
    authorities = list(context.bundle.authorities)
    if include_federated:
        for trust_domain in sorted(context.federated, key=lambda td: td.name):
            authorities.extend(context.federated[trust_domain].authorities)
    return dump_pem_certificates(authorities)


def x509_files(svid: X509SVID, context: X509Context, layout: X509Layout) -> tuple[OutputFile, ...]:
    """The X.509 files in the order they are written: bundle, chain, key, then the combined file."""
    chain = svid.cert_chain_pem()
    key = svid.private_key_pem()
    files = [
        OutputFile(
            name=layout.svid_bundle_file_name,
            data=bundle_pem(context, include_federated=layout.include_federated_bundles),
            mode=layout.cert_file_mode,
        ),
        OutputFile(name=layout.svid_file_name, data=chain, mode=layout.cert_file_mode),
        OutputFile(name=layout.svid_key_file_name, data=key, mode=layout.key_file_mode),
    ]
    if layout.combined_file_name is not None:
        files.append(OutputFile(name=layout.combined_file_name, data=key + chain, mode=layout.key_file_mode))
    return tuple(files)


def jwt_svid_file(svid: JWTSVID, name: str, *, mode: int = PRIVATE_MODE) -> OutputFile:
    """The token alone, without a newline, as spiffe-helper writes it."""
    return OutputFile(name=name, data=svid.token.encode("ascii"), mode=mode)


def jwt_bundle_file(bundles: Mapping[TrustDomain, JWTBundle], name: str, *, mode: int = PUBLIC_MODE) -> OutputFile:
    """``{"<trust domain>": {"keys": [...]}, ...}``: each trust domain's JWKS, by name, sorted."""
    document = {td.name: json.loads(bundles[td].jwks()) for td in sorted(bundles, key=lambda td: td.name)}
    return OutputFile(name=name, data=json.dumps(document, indent=2).encode() + b"\n", mode=mode)


def write_files(directory: Path, files: Iterable[OutputFile]) -> list[Path]:
    """Write ``files`` into ``directory`` in order, each atomically with its mode; their paths."""
    written = []
    for output in files:
        path = directory / output.name
        write_atomically(path, output.data, mode=output.mode)
        written.append(path)
    return written


def write_x509_files(directory: Path, context: X509Context, layout: X509Layout | None = None) -> list[Path]:
    """Write the default SVID's files (``svid.pem``, ``svid_key.pem`` 0600, ``bundle.pem``), creating
    ``directory`` if needed. What ``spiffe-agent api fetch x509 --write`` does."""
    directory.mkdir(parents=True, exist_ok=True)
    return write_files(directory, x509_files(context.svids[0], context, layout or X509Layout()))


def describe(files: Sequence[OutputFile]) -> list[str]:
    """The names of ``files``, for logs (never their contents)."""
    return [output.name for output in files]
