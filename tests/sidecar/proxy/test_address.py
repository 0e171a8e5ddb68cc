from __future__ import annotations

import pytest

from sidecar.proxy.address import Address, check_plaintext
from sidecar.proxy.errors import ProxyConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", Address(host="127.0.0.1", port=8080)),
        ("localhost:0", Address(host="localhost", port=0)),
        ("[::1]:443", Address(host="::1", port=443)),
        ("backend.internal:9000", Address(host="backend.internal", port=9000)),
        ("unix:/run/app.sock", Address(path="/run/app.sock")),
    ],
)
def test_parse_and_str_round_trip(text: str, expected: Address) -> None:
    assert Address.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8080", 'proxy: address must be host:port, [v6]:port or unix:/path: "8080"'),
        (":8080", 'proxy: address must be host:port, [v6]:port or unix:/path: ":8080"'),
        ("::1:443", 'proxy: IPv6 address must be in brackets: [v6]:port: "::1:443"'),
        ("[::1:443", 'proxy: IPv6 address must be in brackets: [v6]:port: "[::1:443"'),
        ("[nope]:443", 'proxy: not a valid IPv6 address: "[nope]:443"'),
        ("host:http", 'proxy: port must be a decimal number: "host:http"'),
        ("host:70000", 'proxy: port must be between 0 and 65535: "host:70000"'),
        ("unix:relative.sock", 'proxy: unix socket address must be unix:/absolute/path: "unix:relative.sock"'),
    ],
)
def test_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(ProxyConfigError) as info:
        Address.parse(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("127.9.9.9:1", True),
        ("[::1]:1", True),
        ("localhost:1", True),
        ("unix:/x.sock", True),
        ("10.0.0.1:1", False),
        ("[2001:db8::1]:1", False),
        ("example.com:1", False),
        ("0.0.0.0:1", False),
    ],
)
def test_plaintext_sides_stay_on_the_machine(text: str, loopback: bool) -> None:
    address = Address.parse(text)
    assert address.is_loopback is loopback
    if loopback:
        check_plaintext(address, role="upstream", unsafe_flag="--unsafe-upstream")
    else:
        with pytest.raises(ProxyConfigError) as info:
            check_plaintext(address, role="upstream", unsafe_flag="--unsafe-upstream")
        assert str(info.value) == (
            "proxy: plaintext upstream must be a unix socket or a loopback address "
            f"(use --unsafe-upstream to allow it): {text!r}".replace("'", '"')
        )
        check_plaintext(address, role="upstream", unsafe_flag="--unsafe-upstream", allow_unsafe=True)
