"""The error hierarchy: exact messages, and errors that survive pickle and copy (multiprocessing)."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest

from spiffecore import (
    AuthorizationError,
    BundleError,
    BundleNotFoundError,
    JWTSVIDError,
    PolicyError,
    SpiffeError,
    SpiffeID,
    SpiffeIDError,
    TLSConfigError,
    VerificationError,
    X509SVIDError,
)
from spiffecore.der import DERError

PEER = SpiffeID.parse("spiffe://example.org/intruder")

# Each error class, with a rule and a value, a rule alone, or the value None (which is shown).
ERRORS = [
    pytest.param(SpiffeError("rule", "value"), 'spiffe: rule: "value"', id="SpiffeError"),
    pytest.param(
        SpiffeIDError("scheme is missing or invalid", "http://x"),
        'spiffeid: scheme is missing or invalid: "http://x"',
        id="SpiffeIDError",
    ),
    pytest.param(
        X509SVIDError("certificate chain must not be empty"),
        "x509svid: certificate chain must not be empty",
        id="X509SVIDError-no-value",
    ),
    pytest.param(JWTSVIDError("token has expired", None), 'jwtsvid: token has expired: "None"', id="JWTSVIDError-none"),
    pytest.param(BundleError("duplicate key ID", "k\n1"), 'bundle: duplicate key ID: "k\\n1"', id="BundleError"),
    pytest.param(
        BundleNotFoundError("no JWT bundle for trust domain", "other.org"),
        'bundle: no JWT bundle for trust domain: "other.org"',
        id="BundleNotFoundError",
    ),
    pytest.param(
        VerificationError("peer presented no certificate"),
        "x509svid: peer presented no certificate",
        id="VerificationError",
    ),
    pytest.param(
        AuthorizationError(PEER, 'want ID "spiffe://example.org/a"'),
        'authorize: "spiffe://example.org/intruder" is not allowed: want ID "spiffe://example.org/a"',
        id="AuthorizationError",
    ),
    pytest.param(
        PolicyError("a wildcard must be a whole segment", "/a*"),
        'authorize: a wildcard must be a whole segment: "/a*"',
        id="PolicyError",
    ),
    pytest.param(TLSConfigError("no authorities", 7), 'tls: no authorities: "7"', id="TLSConfigError-int"),
    pytest.param(
        DERError("truncated length at byte 1", b"\x30"), "der: truncated length at byte 1: 0x30", id="DERError"
    ),
]


def _round_trip(error: SpiffeError) -> SpiffeError:
    """Through pickle, as multiprocessing sends an error raised in a worker."""
    twin = pickle.loads(pickle.dumps(error))  # noqa: S301 (bytes we just made)
    assert isinstance(twin, SpiffeError)
    return twin


COPIES: dict[str, Callable[[SpiffeError], object]] = {
    "pickle": _round_trip,
    "copy": copy.copy,
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize(("error", "message"), ERRORS)
def test_messages_are_layer_rule_and_quoted_value(error: SpiffeError, message: str) -> None:
    assert str(error) == message


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize(("error", "message"), ERRORS)
def test_errors_survive_pickle_and_copy_unchanged(error: SpiffeError, message: str, how: str) -> None:
    twin = COPIES[how](error)
    assert type(twin) is type(error)
    assert isinstance(twin, SpiffeError)
    assert twin is not error
    assert str(twin) == message
    assert (twin.rule, twin.value, twin.args) == (error.rule, error.value, error.args)


def test_no_value_and_the_value_none_stay_apart() -> None:
    without = VerificationError("rule")
    with_none = VerificationError("rule", None)
    assert (without.value, with_none.value) == (None, None)
    assert (without.args, with_none.args) == (("rule",), ("rule", None))
    assert (str(without), str(with_none)) == ("x509svid: rule", 'x509svid: rule: "None"')
    assert str(_round_trip(without)) == "x509svid: rule"
    assert str(_round_trip(with_none)) == 'x509svid: rule: "None"'


def test_authorization_error_keeps_peer_and_reason() -> None:
    error = AuthorizationError(PEER, "want any of []")
    assert (error.value, error.rule) == ("spiffe://example.org/intruder", "want any of []")
    assert error.args == ("spiffe://example.org/intruder", "want any of []")
    twin = _round_trip(error)
    assert (twin.value, twin.rule) == (error.value, error.rule)


def test_a_long_value_is_cut_in_the_message_but_kept_whole() -> None:
    error = BundleError("bad", "x" * 300)
    assert str(error) == 'bundle: bad: "' + "x" * 200 + '"... (300 characters)'
    assert _round_trip(error).value == "x" * 300
