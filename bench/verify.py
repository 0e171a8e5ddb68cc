"""Benchmark: X.509-SVID verifications and JWT-SVID validations per second, against raw crypto.

Why this path is hot: every mTLS handshake in the proxy and the agent ends in
``verify_x509_svid`` on the peer's chain, and every JWT-SVID that reaches the Workload API or a
service goes through ``JWTSVID.parse_and_validate``. Both sit on the request path, once per
connection or per request, so their cost above the signature checks they must do is pure tax.

What it measures, in one run and on the same inputs:

- X.509: ``verify_x509_svid`` for a P-256 leaf under its root, a P-256 leaf under an
  intermediate, and an RSA-2048 leaf under an RSA root; "raw" is ``issuer_key.verify(...)`` of
  every certificate in the path except the trust anchor, on precomputed keys, signatures and TBS
  bytes; the peer column is cryptography's ``x509.verification`` client verifier alone, built per
  call over the prebuilt store with the same extension policies, as ``verify_x509_svid`` does.
- JWT: ``JWTSVID.parse_and_validate`` for ES256, ES384, RS256 and PS256; "raw" is the signature
  check alone over the signing input (ECDSA signatures converted to DER once, outside the loop);
  the peer column is ``jwt.decode`` with full validation, what a Python user would call instead.

Method: each function is warmed up and calibrated so one batch takes about the same wall time;
then, for several repetitions, every function of every case runs one batch, the order rotating
each repetition so machine noise hits them alike. The clock is ``time.perf_counter_ns`` (wall
time; the benchmark is single-threaded); the garbage collector stays on, so allocation is paid
for. Reported: the median time per operation, operations per second, and overhead over raw.
The first three X.509 cases parse their certificates once, so cryptography's per-object caches
(``Certificate.extensions``, the issuer's public key) are reused across calls; the "from DER" case
parses the chain on every call in all three columns, as a handshake does (``tls.peer_chain``).

Run from the repository root: ``.venv/bin/python bench/verify.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import cryptography
import jwt
from cryptography import x509
from cryptography.hazmat.backends.openssl import backend
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import table
from spiffecore import JWTSVID, BundleSet, SpiffeBundle, TrustDomain, VerificationCache, verify_x509_svid
from spiffecore.verify import _CA_POLICY, _EE_POLICY

TARGET_OVERHEAD: Final = 0.25
AUDIENCE: Final = "service-a"
NOW: Final = datetime.now(UTC).replace(microsecond=0)
EC_DOMAIN: Final = TrustDomain.parse("p256.bench.example")
RSA_DOMAIN: Final = TrustDomain.parse("rsa.bench.example")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
Operation = Callable[[], object]


@dataclass(frozen=True, slots=True, kw_only=True)
class Mode:
    """How long to measure: repetitions, and the wall time one batch of one function should take."""

    repetitions: int
    batch_ns: int
    calibration_ns: int


FULL: Final = Mode(repetitions=7, batch_ns=250_000_000, calibration_ns=40_000_000)
QUICK: Final = Mode(repetitions=3, batch_ns=40_000_000, calibration_ns=10_000_000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Family:
    """A group of cases measured against the same kind of raw cost and the same peer."""

    key: str
    title: str
    peer: str


X509_FAMILY: Final = Family(
    key="x509", title="X.509-SVID verification (spiffecore.verify_x509_svid)", peer="x509.verification"
)
X509_CACHED_FAMILY: Final = Family(
    key="x509-cached",
    title="X.509-SVID verification with a VerificationCache (a peer reconnecting with its SVID)",
    peer="x509.verification",
)
JWT_FAMILY: Final = Family(
    key="jwt", title="JWT-SVID validation (spiffecore.JWTSVID.parse_and_validate)", peer="jwt.decode"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One input, and the three ways of checking it that are timed side by side."""

    family: Family
    name: str
    ours: Operation
    raw: Operation
    peer: Operation

    def operations(self) -> dict[str, Operation]:
        return {"ours": self.ours, "raw": self.raw, "peer": self.peer}


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """The per-operation times of one case, in nanoseconds, one sample per repetition."""

    case: Case
    samples: dict[str, list[float]]

    def median_us(self, which: str) -> float:
        return statistics.median(self.samples[which]) / 1000

    def ops_per_second(self, which: str) -> float:
        return 1_000_000 / self.median_us(which)

    def overhead(self, which: str) -> float:
        """How much slower ``which`` is than the raw signature checks, as a fraction."""
        return self.median_us(which) / self.median_us("raw") - 1

    def spread(self, which: str) -> float:
        """The largest distance of one sample from the median, as a fraction of the median."""
        median = statistics.median(self.samples[which])
        return max(abs(sample - median) for sample in self.samples[which]) / median


# --- minting: a root, an intermediate and leaves, built with cryptography at start-up ---------


def _new_key(kind: str) -> PrivateKey:
    if kind == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    curves: dict[str, ec.EllipticCurve] = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}
    return ec.generate_private_key(curves[kind])


def _usage(*, leaf: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=leaf,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not leaf,
        crl_sign=not leaf,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(subject: x509.Name, issuer: x509.Name, key: PublicKey, lifetime: timedelta) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + lifetime)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Authority:
    """A CA certificate and its key: a root when ``cert`` is self-signed."""

    cert: x509.Certificate
    key: PrivateKey


def _root(trust_domain: TrustDomain, kind: str) -> Authority:
    key = _new_key(kind)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{trust_domain} root")])
    builder = _ca_extensions(_builder(name, name, key.public_key(), timedelta(days=1)), trust_domain, key)
    return Authority(cert=builder.sign(key, hashes.SHA256()), key=key)


def _intermediate(trust_domain: TrustDomain, parent: Authority) -> Authority:
    key = _new_key("p256")
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{trust_domain} intermediate")])
    builder = _builder(name, parent.cert.subject, key.public_key(), timedelta(hours=12))
    builder = _ca_extensions(builder, trust_domain, key).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), critical=False
    )
    return Authority(cert=builder.sign(parent.key, hashes.SHA256()), key=key)


def _ca_extensions(
    builder: x509.CertificateBuilder, trust_domain: TrustDomain, key: PrivateKey
) -> x509.CertificateBuilder:
    uri = x509.UniformResourceIdentifier(trust_domain.id_string())
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(leaf=False), critical=True)
        .add_extension(x509.SubjectAlternativeName([uri]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _leaf(trust_domain: TrustDomain, issuer: Authority, kind: str) -> x509.Certificate:
    """A well-formed X509-SVID ``spiffe://<td>/workload`` (empty subject, so a critical SAN)."""
    key = _new_key(kind)
    uri = x509.UniformResourceIdentifier(trust_domain.id_string() + "/workload")
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    builder = (
        _builder(x509.Name([]), issuer.cert.subject, key.public_key(), timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([uri]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(leaf=True), critical=True)
        .add_extension(eku, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    )
    return builder.sign(issuer.key, hashes.SHA256())


# --- the X.509 cases ----------------------------------------------------------------------------


SignatureCheck = Callable[[object, bytes, bytes], None]


def _signature_check(cert: x509.Certificate) -> SignatureCheck:
    """``issuer_key.verify(signature, tbs, ...)`` with the scheme of ``cert``'s signature, built once."""
    algorithm = cert.signature_hash_algorithm
    parameters = cert.signature_algorithm_parameters
    assert algorithm is not None
    if isinstance(parameters, ec.ECDSA):
        ecdsa = parameters

        def check_ecdsa(key: object, signature: bytes, tbs: bytes) -> None:
            assert isinstance(key, ec.EllipticCurvePublicKey)
            key.verify(signature, tbs, ecdsa)

        return check_ecdsa
    assert isinstance(parameters, padding.PKCS1v15)
    pkcs1 = parameters

    def check_pkcs1(key: object, signature: bytes, tbs: bytes) -> None:
        assert isinstance(key, rsa.RSAPublicKey)
        key.verify(signature, tbs, pkcs1, algorithm)

    return check_pkcs1


def _raw_path(chain: Sequence[x509.Certificate], anchor: x509.Certificate) -> Operation:
    """Every signature of the path (leaf first) except the trust anchor's own, on precomputed inputs."""
    issuers = [*chain[1:], anchor]
    checks = [
        functools.partial(_signature_check(cert), issuer.public_key(), cert.signature, cert.tbs_certificate_bytes)
        for cert, issuer in zip(chain, issuers, strict=True)
    ]
    if len(checks) == 1:
        return checks[0]

    def run() -> None:
        for check in checks:
            check()

    return run


def _raw_fresh_path(ders: Sequence[bytes], chain: Sequence[x509.Certificate], anchor: x509.Certificate) -> Operation:
    """Parse the chain from DER, then check its signatures; only the schemes and the anchor's key are kept."""
    checks = [_signature_check(cert) for cert in chain]
    anchor_key = anchor.public_key()

    def run() -> None:
        certs = _parse(ders)
        keys = [*(cert.public_key() for cert in certs[1:]), anchor_key]
        for check, cert, key in zip(checks, certs, keys, strict=True):
            check(key, cert.signature, cert.tbs_certificate_bytes)

    return run


def _cryptography_verifier(anchor: x509.Certificate, chain_of: Callable[[], Sequence[x509.Certificate]]) -> Operation:
    """cryptography's client verifier alone, built per call as ``verify_x509_svid`` builds it."""
    store = verification.Store([anchor])

    def run() -> object:
        chain = chain_of()
        verifier = (
            verification.PolicyBuilder()
            .store(store)
            .time(NOW)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
            .build_client_verifier()
        )
        return verifier.verify(chain[0], list(chain[1:]))

    return run


def _x509_case(name: str, chain: tuple[x509.Certificate, ...], anchor: x509.Certificate, bundles: BundleSet) -> Case:
    return Case(
        family=X509_FAMILY,
        name=name,
        ours=lambda: verify_x509_svid(chain, bundles, at=NOW),
        raw=_raw_path(chain, anchor),
        peer=_cryptography_verifier(anchor, lambda: chain),
    )


def _parse(ders: Sequence[bytes]) -> tuple[x509.Certificate, ...]:
    return tuple(x509.load_der_x509_certificate(der) for der in ders)


def _fresh_x509_case(
    name: str, chain: tuple[x509.Certificate, ...], anchor: x509.Certificate, bundles: BundleSet
) -> Case:
    """The chain as a handshake hands it over (``tls.peer_chain``): all three parse it from DER each call."""
    ders = [cert.public_bytes(Encoding.DER) for cert in chain]
    return Case(
        family=X509_FAMILY,
        name=name,
        ours=lambda: verify_x509_svid(_parse(ders), bundles, at=NOW),
        raw=_raw_fresh_path(ders, chain, anchor),
        peer=_cryptography_verifier(anchor, lambda: _parse(ders)),
    )


def _cached_x509_case(
    name: str, chain: tuple[x509.Certificate, ...], anchor: x509.Certificate, bundles: BundleSet
) -> Case:
    """A handshake from a peer seen before: the chain is parsed from DER, then found in the cache."""
    ders = [cert.public_bytes(Encoding.DER) for cert in chain]
    cache = VerificationCache()
    verify_x509_svid(_parse(ders), bundles, at=NOW, cache=cache)
    return Case(
        family=X509_CACHED_FAMILY,
        name=name,
        ours=lambda: verify_x509_svid(_parse(ders), bundles, at=NOW, cache=cache),
        raw=_raw_fresh_path(ders, chain, anchor),
        peer=_cryptography_verifier(anchor, lambda: _parse(ders)),
    )


def x509_cases(ec_root: Authority, rsa_root: Authority, bundles: BundleSet) -> list[Case]:
    intermediate = _intermediate(EC_DOMAIN, ec_root)
    direct = (_leaf(EC_DOMAIN, ec_root, "p256"),)
    via_intermediate = (_leaf(EC_DOMAIN, intermediate, "p256"), intermediate.cert)
    rsa_direct = (_leaf(RSA_DOMAIN, rsa_root, "rsa-2048"),)
    return [
        _x509_case("P-256 leaf <- root", direct, ec_root.cert, bundles),
        _x509_case("P-256 leaf <- int. <- root", via_intermediate, ec_root.cert, bundles),
        _x509_case("RSA-2048 leaf <- root", rsa_direct, rsa_root.cert, bundles),
        _fresh_x509_case("P-256 leaf <- root, from DER", direct, ec_root.cert, bundles),
        _cached_x509_case("P-256 leaf <- root, cache hit", direct, ec_root.cert, bundles),
        _cached_x509_case("P-256 leaf <- int. <- root, cache hit", via_intermediate, ec_root.cert, bundles),
        _cached_x509_case("RSA-2048 leaf <- root, cache hit", rsa_direct, rsa_root.cert, bundles),
    ]


# --- the JWT cases ------------------------------------------------------------------------------

_JWT_KEYS: Final = {"ES256": "p256", "ES384": "p384", "RS256": "rsa-2048", "PS256": "rsa-2048"}
_JWT_HASHES: Final[dict[str, hashes.HashAlgorithm]] = {
    "ES256": hashes.SHA256(),
    "ES384": hashes.SHA384(),
    "RS256": hashes.SHA256(),
    "PS256": hashes.SHA256(),
}


def _mint_jwt(algorithm: str, key: PrivateKey) -> str:
    claims = {
        "sub": EC_DOMAIN.id_string() + "/workload",
        "aud": [AUDIENCE],
        "iat": int(NOW.timestamp()),
        "exp": int((NOW + timedelta(hours=1)).timestamp()),
    }
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": algorithm.lower(), "typ": "JWT"})


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _raw_jwt_check(algorithm: str, token: str, key: PublicKey) -> Operation:
    """The JWS signature check alone, on the signing input and a signature decoded beforehand."""
    header, payload, encoded_signature = token.split(".")
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = _b64url(encoded_signature)
    digest = _JWT_HASHES[algorithm]
    if isinstance(key, ec.EllipticCurvePublicKey):
        half = len(signature) // 2
        der = encode_dss_signature(int.from_bytes(signature[:half]), int.from_bytes(signature[half:]))
        ecdsa = ec.ECDSA(digest)
        return lambda: key.verify(der, signing_input, ecdsa)
    if algorithm.startswith("PS"):
        pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        return lambda: key.verify(signature, signing_input, pss, digest)
    pkcs1 = padding.PKCS1v15()
    return lambda: key.verify(signature, signing_input, pkcs1, digest)


def _jwt_case(algorithm: str, key: PrivateKey, bundles: BundleSet) -> Case:
    token = _mint_jwt(algorithm, key)
    public_key = key.public_key()
    return Case(
        family=JWT_FAMILY,
        name=algorithm,
        ours=lambda: JWTSVID.parse_and_validate(token, bundles, AUDIENCE, at=NOW),
        raw=_raw_jwt_check(algorithm, token, public_key),
        peer=lambda: jwt.decode(token, public_key, algorithms=[algorithm], audience=AUDIENCE),
    )


def jwt_cases(keys: dict[str, PrivateKey], bundles: BundleSet) -> list[Case]:
    return [_jwt_case(algorithm, keys[algorithm], bundles) for algorithm in _JWT_KEYS]


def build_cases() -> list[Case]:
    ec_root, rsa_root = _root(EC_DOMAIN, "p256"), _root(RSA_DOMAIN, "rsa-2048")
    rsa_jwt_key = _new_key("rsa-2048")
    jwt_keys = {alg: rsa_jwt_key if kind == "rsa-2048" else _new_key(kind) for alg, kind in _JWT_KEYS.items()}
    bundles = BundleSet.of(
        SpiffeBundle.create(
            EC_DOMAIN,
            x509_authorities=(ec_root.cert,),
            jwt_authorities={alg.lower(): key.public_key() for alg, key in jwt_keys.items()},
        ),
        SpiffeBundle.create(RSA_DOMAIN, x509_authorities=(rsa_root.cert,)),
    )
    return [*x509_cases(ec_root, rsa_root, bundles), *jwt_cases(jwt_keys, bundles)]


# --- measuring ----------------------------------------------------------------------------------


def _time_batch(operation: Operation, iterations: int) -> int:
    """Wall nanoseconds for ``iterations`` calls of ``operation``."""
    start = time.perf_counter_ns()
    for _ in itertools.repeat(None, iterations):
        operation()
    return time.perf_counter_ns() - start


def _calibrate(operation: Operation, mode: Mode) -> int:
    """Warm ``operation`` up, then return how many calls make one batch of ``mode.batch_ns``."""
    iterations = 1
    while (elapsed := _time_batch(operation, iterations)) < mode.calibration_ns:
        iterations *= 2
    return max(1, mode.batch_ns * iterations // elapsed)


def measure(cases: Sequence[Case], mode: Mode) -> list[Result]:
    """Time every operation of every case once per repetition, rotating their order each time."""
    batches = [(case, which, operation) for case in cases for which, operation in case.operations().items()]
    iterations = [_calibrate(operation, mode) for _, _, operation in batches]
    samples: dict[tuple[str, str], list[float]] = {(case.name, which): [] for case, which, _ in batches}
    for repetition in range(mode.repetitions):
        shift = repetition % len(batches)
        order = [*range(shift, len(batches)), *range(shift)]
        for index in order:
            case, which, operation = batches[index]
            samples[case.name, which].append(_time_batch(operation, iterations[index]) / iterations[index])
    return [
        Result(case=case, samples={which: samples[case.name, which] for which in case.operations()}) for case in cases
    ]


# --- reporting ----------------------------------------------------------------------------------


def _environment(mode: Mode) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "openssl": backend.openssl_version_text(),
        "pyjwt": jwt.__version__,
        "machine": f"{platform.system()} {platform.machine()}",
        "clock": "time.perf_counter_ns (wall), single thread, gc enabled",
        "repetitions": mode.repetitions,
        "batch_ms": mode.batch_ns / 1e6,
        "statistic": "median over repetitions",
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    family: Family
    met: bool
    worst: Result


def verdicts(results: Sequence[Result]) -> list[Verdict]:
    """Per family: is our overhead over raw under the target in every case?"""
    verdict_list: list[Verdict] = []
    for family in (X509_FAMILY, X509_CACHED_FAMILY, JWT_FAMILY):
        members = [result for result in results if result.case.family == family]
        worst = max(members, key=lambda result: result.overhead("ours"))
        verdict_list.append(Verdict(family=family, met=worst.overhead("ours") < TARGET_OVERHEAD, worst=worst))
    return verdict_list


_HEADER: Final = (
    *("case", "ours µs", "ours op/s", "±"),
    *("raw µs", "raw op/s", "peer µs", "peer op/s", "ours/raw", "peer/raw"),
)


def _row(result: Result) -> tuple[str, ...]:
    return (
        result.case.name,
        f"{result.median_us('ours'):.1f}",
        f"{result.ops_per_second('ours'):,.0f}",
        f"{result.spread('ours'):.0%}",
        f"{result.median_us('raw'):.1f}",
        f"{result.ops_per_second('raw'):,.0f}",
        f"{result.median_us('peer'):.1f}",
        f"{result.ops_per_second('peer'):,.0f}",
        f"{result.overhead('ours'):+.1%}",
        f"{result.overhead('peer'):+.1%}",
    )


def render_text(results: Sequence[Result], mode: Mode) -> str:
    environment = _environment(mode)
    lines = [
        "spiffe-sidecar verify benchmark",
        *(f"  {key}: {value}" for key, value in environment.items()),
        "raw = the same signature checks done directly with cryptography; ± = largest deviation of ours from its",
        "median; x/raw = (x - raw) / raw, the overhead above the raw signature checks",
    ]
    for family in (X509_FAMILY, X509_CACHED_FAMILY, JWT_FAMILY):
        rows = [_row(result) for result in results if result.case.family == family]
        lines += ["", f"{family.title}; peer = {family.peer}", *table([_HEADER, *rows])]
    lines.append("")
    for verdict in verdicts(results):
        state = "MET" if verdict.met else "NOT MET"
        lines.append(
            f"{verdict.family.key}: target ours <= raw + {TARGET_OVERHEAD:.0%} {state} "
            f"(worst: {verdict.worst.case.name} at {verdict.worst.overhead('ours'):+.1%})"
        )
    return "\n".join(lines)


def render_json(results: Sequence[Result], mode: Mode) -> str:
    document = {
        "environment": _environment(mode),
        "target_overhead": TARGET_OVERHEAD,
        "results": [
            {
                "family": result.case.family.key,
                "case": result.case.name,
                "peer": result.case.family.peer,
                **{f"{which}_us": round(result.median_us(which), 3) for which in ("ours", "raw", "peer")},
                **{f"{which}_ops_per_s": round(result.ops_per_second(which)) for which in ("ours", "raw", "peer")},
                "ours_overhead": round(result.overhead("ours"), 4),
                "peer_overhead": round(result.overhead("peer"), 4),
                "samples_ns": {which: [round(sample) for sample in values] for which, values in result.samples.items()},
            }
            for result in results
        ],
        "verdicts": {
            verdict.family.key: {
                "met": verdict.met,
                "worst_case": verdict.worst.case.name,
                "worst_overhead": round(verdict.worst.overhead("ours"), 4),
            }
            for verdict in verdicts(results)
        },
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "X.509-SVID verifications and JWT-SVID validations per second, next to the raw "
            "cryptography cost of the same signature checks and to the peers (cryptography's "
            f"x509.verification, pyjwt's jwt.decode), all measured in the same run. Target: our "
            f"overhead over raw under {TARGET_OVERHEAD:.0%}."
        )
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer, shorter repetitions: a smoke run of a few seconds (full: ~45 s)"
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    results = measure(build_cases(), mode)
    print(render_json(results, mode) if args.json else render_text(results, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
