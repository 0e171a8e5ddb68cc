"""The generated code is in step with proto/ and speaks the Workload API's wire names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from spiffeproto import workload_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_its_sources() -> None:
    result = subprocess.run(  # noqa: S603
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_workload_api_has_no_package_so_method_paths_match_the_spec() -> None:
    service = workload_pb2.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"]
    assert workload_pb2.DESCRIPTOR.package == ""
    assert service.full_name == "SpiffeWorkloadAPI"
    assert sorted(method.name for method in service.methods) == [
        "FetchJWTBundles",
        "FetchJWTSVID",
        "FetchX509Bundles",
        "FetchX509SVID",
        "ValidateJWTSVID",
    ]
    streaming = {method.name for method in service.methods if method.server_streaming}
    assert streaming == {"FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles"}


def test_workload_api_field_numbers_are_the_specs() -> None:
    fields = {f.name: f.number for f in workload_pb2.X509SVID.DESCRIPTOR.fields}
    assert fields == {"spiffe_id": 1, "x509_svid": 2, "x509_svid_key": 3, "bundle": 4, "hint": 5}
    response = {f.name: f.number for f in workload_pb2.X509SVIDResponse.DESCRIPTOR.fields}
    assert response == {"svids": 1, "crl": 2, "federated_bundles": 3}
    request = {f.name: f.number for f in workload_pb2.JWTSVIDRequest.DESCRIPTOR.fields}
    assert request == {"audience": 1, "spiffe_id": 2}
