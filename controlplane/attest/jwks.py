"""An issuer's public keys (a JWK Set): parsed, picked by key ID, loaded from a file or URL, kept fresh.

Kubernetes signs service account tokens with keys it publishes as a JWK Set (RFC 7517) at its
issuer's ``/openid/v1/jwks``. A token attestor verifies tokens against such a set, read from a
file (``kubectl get --raw /openid/v1/jwks``, often mounted from a ConfigMap) or fetched from a URL.

:func:`parse_jwks` is pure. It keeps only asymmetric signing keys that have a key ID: RSA, and EC
on P-256, P-384 or P-521. A symmetric (``oct``) key is ignored, so no token is ever checked with
HMAC under a key published as public; keys for another ``use`` than ``sig``, with an ``alg`` that
is not an asymmetric signature, or that cannot be read, are ignored too. Two keys with one key ID
make the set ambiguous, and it is refused.

:class:`KeyCache` holds the last set loaded. It loads again when the set is older than
``max_age`` (so a key the issuer withdrew stops being trusted), and when a token names a key ID
the set lacks (the issuer rotated its keys), but never more often than once per
``min_interval``: tokens with made-up key IDs cannot make the server hammer the issuer. When a
load fails, the keys already held stay in use and the failure is logged; with none held, the
failure is the answer.

:class:`JWKSURL` fetches with a timeout over HTTPS (plain HTTP only to a loopback address), with
an optional CA file and bearer token (the Kubernetes API server wants both), through no proxy and
following no redirect, and reads at most :data:`MAX_JWKS_BYTES`.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import PyJWK, PyJWTError

from spiffecore import SpiffeError

MAX_JWKS_BYTES: Final = 1024 * 1024
MAX_TOKEN_FILE_BYTES: Final = 64 * 1024
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_MAX_AGE: Final = 300.0
DEFAULT_MIN_INTERVAL: Final = 10.0

RSA_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS: Final = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
SIGNING_ALGORITHMS: Final = (*RSA_ALGORITHMS, *EC_ALGORITHMS)
"""The asymmetric JWS algorithms a token may be signed with; ``none`` and ``HS*`` are not among them."""

log = logging.getLogger(__name__)


class JWKSError(SpiffeError):
    """A JWK Set cannot be loaded or read. The message says why; it never quotes a token."""

    layer = "jwks"


class UnknownKeyError(JWKSError):
    """The set holds no key with the key ID a token names, even after loading it again."""


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuerKey:
    """One public signing key of an issuer, and the ``alg`` its JWK pins, if any."""

    kid: str
    key: PublicKey
    algorithm: str | None = None

    def fits(self, algorithm: str) -> bool:
        """Whether a token signed with ``algorithm`` may be checked with this key."""
        if algorithm not in SIGNING_ALGORITHMS or (self.algorithm is not None and self.algorithm != algorithm):
            return False
        if isinstance(self.key, rsa.RSAPublicKey):
            return algorithm in RSA_ALGORITHMS
        return EC_ALGORITHMS.get(algorithm) == self.key.curve.name

    @property
    def kind(self) -> str:
        """``RSA`` or the EC curve, for messages."""
        return "RSA" if isinstance(self.key, rsa.RSAPublicKey) else f"EC {self.key.curve.name}"


def _issuer_key(jwk: object) -> IssuerKey | None:
    """The JWK as an issuer key, or ``None`` when it is not one a token may be checked with."""
    if not isinstance(jwk, dict):
        return None
    kid, kty, use, alg = jwk.get("kid"), jwk.get("kty"), jwk.get("use"), jwk.get("alg")
    if not isinstance(kid, str) or not kid or kty not in ("RSA", "EC") or use not in (None, "sig"):
        return None
    if alg is not None and alg not in SIGNING_ALGORITHMS:
        return None
    try:
        parsed = PyJWK(jwk)
    except (PyJWTError, ValueError, TypeError):
        return None
    key = parsed.key
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        key = key.public_key()  # a set that wrongly carries private parts: only the public part is used
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return None
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in EC_ALGORITHMS.values():
        return None
    return IssuerKey(kid=kid, key=key, algorithm=alg)


def parse_jwks(data: bytes) -> Mapping[str, IssuerKey]:
    """The usable keys of the JWK Set ``data``, by key ID. Raises :class:`JWKSError`."""
    if len(data) > MAX_JWKS_BYTES:
        raise JWKSError(f"the JWK Set is larger than {MAX_JWKS_BYTES} bytes", len(data))
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise JWKSError("the JWK Set is not JSON") from err
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise JWKSError('the JWK Set is not a JSON object with a "keys" list')
    found: dict[str, IssuerKey] = {}
    for jwk in keys:
        key = _issuer_key(jwk)
        if key is None:
            continue
        if key.kid in found:
            raise JWKSError("the JWK Set has two keys with one key ID", key.kid)
        found[key.kid] = key
    if not found:
        raise JWKSError(
            f"the JWK Set holds no usable signing key (RSA or EC with a kid; {len(keys)} keys were ignored)"
        )
    return found


# --- sources ---------------------------------------------------------------------------------------


class JWKSSource(Protocol):
    """Where a JWK Set comes from. ``load`` blocks, and raises :class:`JWKSError`."""

    def load(self) -> bytes: ...

    def describe(self) -> str: ...


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(limit + 1)
    except OSError as err:
        raise JWKSError(f"cannot read the {what} ({err.strerror or err})", str(path)) from err
    if len(data) > limit:
        raise JWKSError(f"the {what} is larger than {limit} bytes", str(path))
    return data


class JWKSFile:
    """A JWK Set in a file, read afresh at every load (a mounted ConfigMap changes in place)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> bytes:
        return _read_limited(self.path, MAX_JWKS_BYTES, "JWK Set file")

    def describe(self) -> str:
        return str(self.path)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_jwks_url(url: str) -> str:
    """``url`` if it is an https URL (or http to a loopback address), else ``ValueError`` saying why."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # a port that is not a number from 0 to 65535 raises here
    except ValueError as err:
        raise ValueError(f"jwks_url is not a URL ({err}): {url!r}") from err
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"jwks_url must be an https:// URL with a host: {url!r}")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(f"jwks_url must use https (plain http only to a loopback address): {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("jwks_url must not carry user information (use jwks_token_file for a bearer token)")
    if parts.fragment:
        raise ValueError(f"jwks_url must not have a fragment: {url!r}")
    return url


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are refused: the keys must come from the URL configured, not where it points."""

    def redirect_request(  # noqa: PLR0917 - urllib's signature
        self,
        req: urllib.request.Request,
        fp: object,
        code: int,
        msg: str,
        headers: object,
        newurl: str,
    ) -> None:
        return None  # urllib then raises HTTPError for the 3xx status


class JWKSURL:
    """A JWK Set served over HTTPS (plain HTTP only on loopback), fetched at every load."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        ca_file: Path | None = None,
        token_file: Path | None = None,
    ) -> None:
        """``ca_file``: PEM roots for the server's certificate (default: the system's). ``token_file``:
        a bearer token sent with each request, read afresh each time (projected tokens rotate)."""
        self.url = check_jwks_url(url)
        self._timeout = timeout
        self._token_file = token_file
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({}), _NoRedirects()]
        if urllib.parse.urlsplit(url).scheme == "https":
            try:
                context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
            except (OSError, ssl.SSLError) as err:
                raise JWKSError(f"cannot load the JWKS CA file ({err})", str(ca_file)) from err
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    def describe(self) -> str:
        return self.url

    def load(self) -> bytes:
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})  # noqa: S310 - checked
        if self._token_file is not None:
            token = _read_limited(self._token_file, MAX_TOKEN_FILE_BYTES, "JWKS bearer token file").strip()
            if not token or not all(0x21 <= byte <= 0x7E for byte in token):
                raise JWKSError("the JWKS bearer token file does not hold a token", str(self._token_file))
            request.add_unredirected_header("Authorization", f"Bearer {token.decode('ascii')}")
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                data: bytes = response.read(MAX_JWKS_BYTES + 1)
        except urllib.error.HTTPError as err:
            err.close()
            raise JWKSError(f"the JWKS URL answered HTTP {err.code}", self.url) from None
        except urllib.error.URLError as err:
            raise JWKSError(f"cannot fetch the JWKS URL ({err.reason})", self.url) from err
        except (OSError, http.client.HTTPException) as err:  # timeouts, TLS failures, broken responses
            raise JWKSError(f"cannot fetch the JWKS URL ({type(err).__name__}: {err})", self.url) from err
        if len(data) > MAX_JWKS_BYTES:
            raise JWKSError(f"the JWKS URL answered with more than {MAX_JWKS_BYTES} bytes", self.url)
        return data


# --- the cache -------------------------------------------------------------------------------------


class KeyCache:
    """The keys of one source, loaded lazily, reloaded when stale or asked for a key ID it lacks.

    Thread-safe; :meth:`key` blocks while it loads (call it from a worker thread).
    """

    def __init__(
        self,
        source: JWKSSource,
        *,
        max_age: float = DEFAULT_MAX_AGE,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._max_age = max_age
        self._min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: Mapping[str, IssuerKey] | None = None
        self._loaded_at = 0.0
        self._attempted_at: float | None = None
        self._failure: JWKSError | None = None
        self.loads = 0
        """How many loads were attempted (for tests and logs)."""

    def load(self) -> Mapping[str, IssuerKey]:
        """Load now, whatever the schedule; raise :class:`JWKSError` on failure (at start-up: fail fast)."""
        with self._lock:
            self._reload(self._clock())
            if self._failure is not None:
                raise self._failure
            assert self._keys is not None
            return self._keys

    def key(self, kid: str) -> IssuerKey:
        """The key with ID ``kid``: :class:`UnknownKeyError` if there is none, :class:`JWKSError` if no
        set could be loaded."""
        with self._lock:
            now = self._clock()
            stale = self._keys is None or now - self._loaded_at >= self._max_age
            if stale and self._may_load(now):
                self._reload(now)
            if self._keys is None:
                assert self._failure is not None
                raise self._failure
            found = self._keys.get(kid)
            if found is None and self._may_load(now):
                self._reload(now)
                found = self._keys.get(kid)
            if found is None:
                raise UnknownKeyError("no issuer key has this key ID", kid)
            return found

    def _may_load(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self._min_interval

    def _reload(self, now: float) -> None:
        self._attempted_at = now
        self.loads += 1
        try:
            keys = parse_jwks(self.source.load())
        except JWKSError as err:
            self._failure = err
            if self._keys is not None:
                log.warning(
                    "cannot reload the issuer keys; keeping the ones loaded before",
                    extra={"source": self.source.describe(), "error": str(err)},
                )
            return
        if self._keys is not None and keys.keys() != self._keys.keys():
            log.info(
                "issuer keys changed",
                extra={"source": self.source.describe(), "key_ids": ",".join(sorted(keys))},
            )
        self._keys = keys
        self._loaded_at = now
        self._failure = None
