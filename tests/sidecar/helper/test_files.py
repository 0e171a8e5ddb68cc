"""What the helper writes, byte for byte, and with which modes."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from sidecar.helper.files import X509Layout, jwt_bundle_file, write_files, write_x509_files, x509_files
from sidecar.workload.identities import X509Context
from spiffecore import X509SVID, JWTBundle, TrustDomain
from tests.support.ca import TestCA

EXAMPLE = TrustDomain.parse("example.org")


@pytest.fixture
def ca() -> TestCA:
    return TestCA.create("example.org")


@pytest.fixture
def context(ca: TestCA) -> X509Context:
    intermediate = ca.intermediate()
    svid = intermediate.mint("/web").svid()
    partners = {TrustDomain.parse(name): TestCA.create(name).x509_bundle() for name in ("zeta.org", "alpha.org")}
    return X509Context(svids=(svid,), bundle=ca.x509_bundle(), federated=partners)


@pytest.fixture
def umask_077() -> Iterator[None]:
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_in_write_order_bundle_chain_key_then_combined(context: X509Context) -> None:
    svid = context.svids[0]
    files = x509_files(svid, context, X509Layout(combined_file_name="combined.pem"))
    assert [(f.name, f.mode) for f in files] == [
        ("bundle.pem", 0o644),
        ("svid.pem", 0o644),
        ("svid_key.pem", 0o600),
        ("combined.pem", 0o600),
    ]
    bundle, chain, key, combined = (f.data for f in files)
    assert bundle == context.bundle.pem()
    assert chain == svid.cert_chain_pem()
    assert len(x509.load_pem_x509_certificates(chain)) == 2  # leaf and intermediate, no root
    assert key == svid.private_key_pem()
    assert key.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert combined == key + chain
    assert X509SVID.load_pem(combined, combined).id == svid.id


def test_federated_roots_are_appended_by_trust_domain_name(context: X509Context) -> None:
    files = x509_files(context.svids[0], context, X509Layout(include_federated_bundles=True))
    roots = x509.load_pem_x509_certificates(files[0].data)
    expected = [
        *context.bundle.authorities,
        *context.federated[TrustDomain.parse("alpha.org")].authorities,
        *context.federated[TrustDomain.parse("zeta.org")].authorities,
    ]
    assert roots == expected


def test_output_files_never_show_their_bytes(context: X509Context) -> None:
    files = x509_files(context.svids[0], context, X509Layout())
    assert "PRIVATE KEY" not in repr(files)


def test_modes_are_exact_whatever_the_umask_and_the_files_before(
    tmp_path: Path, context: X509Context, umask_077: None
) -> None:
    before = {"svid.pem": 0o400, "svid_key.pem": 0o666, "bundle.pem": 0o000, "combined.pem": 0o777}
    for name, mode in before.items():
        path = tmp_path / name
        path.write_bytes(b"old")
        path.chmod(mode)
    layout = X509Layout(combined_file_name="combined.pem", cert_file_mode=0o644, key_file_mode=0o640)
    write_files(tmp_path, x509_files(context.svids[0], context, layout))
    modes = {name: _mode(tmp_path / name) for name in before}
    assert modes == {"svid.pem": 0o644, "svid_key.pem": 0o640, "bundle.pem": 0o644, "combined.pem": 0o640}
    assert (tmp_path / "svid.pem").read_bytes() == context.svids[0].cert_chain_pem()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no temporary files left


def test_write_x509_files_creates_the_directory(tmp_path: Path, context: X509Context) -> None:
    directory = tmp_path / "new" / "dir"
    paths = write_x509_files(directory, context)
    assert [p.name for p in paths] == ["bundle.pem", "svid.pem", "svid_key.pem"]
    assert _mode(directory / "svid_key.pem") == 0o600


def test_the_jwt_bundle_file_maps_trust_domains_to_jwks(ca: TestCA) -> None:
    partner = TestCA.create("partner.org")
    bundles = {
        partner.trust_domain: partner.bundle().jwt,
        EXAMPLE: ca.bundle().jwt,
        TrustDomain.parse("empty.org"): JWTBundle(trust_domain=TrustDomain.parse("empty.org")),
    }
    output = jwt_bundle_file(bundles, "jwks.json")
    document = json.loads(output.data)
    assert list(document) == ["empty.org", "example.org", "partner.org"]
    assert document["empty.org"] == {"keys": []}
    for td, bundle in bundles.items():
        assert JWTBundle.load_jwks(td, json.dumps(document[td.name])) == bundle
    assert output.mode == 0o644
