"""The pure SDS session bookkeeping: state of the world and incremental, without sockets."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.sds.session import (
    Acked,
    DeltaRequest,
    DeltaResponse,
    DeltaSession,
    DeltaSubscribed,
    Nacked,
    ProtocolViolation,
    Rejection,
    SessionUsageError,
    SotwRequest,
    SotwResponse,
    SotwSession,
    StaleNonce,
    Subscribed,
    content_version,
)

V1 = {"default": "a1"}
V2 = {"default": "a2"}
REASON = Rejection(code=13, message="Failed to load certificate chain from <inline>")


def start(names: tuple[str, ...] = ("default",), resources: dict[str, str] = V1) -> tuple[SotwSession, SotwResponse]:
    session = SotwSession(nonce_prefix="n")
    session.receive(SotwRequest(names=names))
    response = session.respond(resources)
    assert response is not None
    return session, response


def ack(response: SotwResponse, names: tuple[str, ...] = ("default",)) -> SotwRequest:
    return SotwRequest(names=names, version_info=response.version, nonce=response.nonce)


# --- state of the world ----------------------------------------------------------------------------------


def test_first_request_is_answered_with_the_full_state() -> None:
    session = SotwSession(nonce_prefix="n")
    events = session.receive(SotwRequest(names=("default",)))
    assert events == (Subscribed(names=("default",), previous=None),)
    assert session.awaiting_response
    response = session.respond(V1)
    assert response == SotwResponse(version=content_version(V1), nonce="n1", names=("default",))
    assert not session.awaiting_response


def test_ack_then_identical_content_sends_nothing() -> None:
    session, response = start()
    assert session.receive(ack(response)) == (Acked(version=response.version, nonce=response.nonce),)
    assert session.accepted_version == response.version
    assert session.respond(V1) is None
    assert session.respond(dict(V1)) is None


def test_changed_content_is_pushed_without_a_request() -> None:
    session, first = start()
    session.receive(ack(first))
    pushed = session.respond(V2)
    assert pushed is not None
    assert pushed.version == content_version(V2) != first.version
    assert pushed.nonce != first.nonce
    assert session.respond(V2) is None


def test_changed_content_is_pushed_before_the_previous_response_is_acked() -> None:
    session, _ = start()
    assert session.respond(V2) is not None


def test_nack_keeps_the_accepted_version_and_does_not_resend() -> None:
    session, first = start()
    session.receive(ack(first))
    bad = session.respond(V2)
    assert bad is not None
    events = session.receive(SotwRequest(names=("default",), version_info=first.version, nonce=bad.nonce, error=REASON))
    assert events == (Nacked(version=bad.version, nonce=bad.nonce, kept_version=first.version, rejection=REASON),)
    assert session.accepted_version == first.version
    assert session.respond(V2) is None  # the rejected content is never sent again
    fixed = session.respond({"default": "a3"})
    assert fixed is not None
    session.receive(ack(fixed))
    assert session.accepted_version == fixed.version


def test_back_to_the_accepted_content_after_a_nack_is_sent() -> None:
    session, first = start()
    session.receive(ack(first))
    bad = session.respond(V2)
    assert bad is not None
    session.receive(SotwRequest(names=("default",), version_info=first.version, nonce=bad.nonce, error=REASON))
    again = session.respond(V1)
    assert again is not None
    assert again.version == first.version


def test_stale_nonce_is_ignored() -> None:
    session, first = start()
    second = session.respond(V2)
    assert second is not None
    assert session.receive(ack(first)) == (StaleNonce(nonce=first.nonce),)
    assert session.accepted_version == ""
    assert session.receive(ack(second, names=("default", "ROOTCA")))[0] == Acked(
        version=second.version, nonce=second.nonce
    )


def test_stale_nonce_with_other_names_changes_nothing() -> None:
    session, first = start()
    session.respond(V2)
    assert session.receive(ack(first, names=("ROOTCA",))) == (StaleNonce(nonce=first.nonce),)
    assert session.names == ("default",)


def test_unknown_nonce_before_any_response_is_stale() -> None:
    session = SotwSession()
    session.receive(SotwRequest(names=("default",)))
    assert session.receive(SotwRequest(names=("default",), nonce="zzz")) == (StaleNonce(nonce="zzz"),)


def test_reconnect_with_an_old_version_is_answered_in_full() -> None:
    """After an agent restart Envoy sends its last accepted version and no nonce."""
    _, before = start()
    session = SotwSession(nonce_prefix="m")
    events = session.receive(SotwRequest(names=("default",), version_info=before.version))
    assert events == (Subscribed(names=("default",), previous=None, client_version=before.version),)
    assert events[0].reconnect
    assert session.accepted_version == before.version
    response = session.respond(V1)  # same content, same version: sent all the same
    assert response is not None
    assert response.version == before.version


def test_empty_nonce_mid_stream_is_answered_again() -> None:
    session, first = start()
    session.receive(ack(first))
    events = session.receive(SotwRequest(names=("default",), version_info=first.version))
    assert events == (Subscribed(names=("default",), previous=("default",), client_version=first.version),)
    assert not events[0].reconnect
    assert session.respond(V1) is not None


def test_changed_names_on_an_ack_are_a_new_subscription() -> None:
    session, first = start()
    events = session.receive(ack(first, names=("default", "ROOTCA")))
    assert events == (
        Acked(version=first.version, nonce=first.nonce),
        Subscribed(names=("default", "ROOTCA"), previous=("default",), client_version=first.version),
    )
    response = session.respond({"default": "a1", "ROOTCA": "r1"})
    assert response is not None
    assert response.names == ("default", "ROOTCA")


def test_changed_names_on_a_nack_are_a_new_subscription() -> None:
    session, first = start()
    events = session.receive(SotwRequest(names=("ROOTCA",), nonce=first.nonce, error=REASON))
    assert [type(e) for e in events] == [Nacked, Subscribed]
    assert session.awaiting_response


def test_respond_before_a_request_is_misuse() -> None:
    with pytest.raises(SessionUsageError, match="before the first request"):
        SotwSession().respond(V1)
    with pytest.raises(SessionUsageError, match="before the first request"):
        DeltaSession().respond(V1)


def test_content_version_depends_on_content_only() -> None:
    assert content_version({"a": "1", "b": "2"}) == content_version({"b": "2", "a": "1"})
    assert content_version({"a": "1"}) != content_version({"a": "2"})
    assert content_version({"a": "1"}) != content_version({"b": "1"})
    assert content_version({"ab": "c"}) != content_version({"a": "bc"})
    assert len({start()[1].version for _ in range(3)}) == 1


def test_nonces_are_unique_and_prefixed() -> None:
    session, first = start()
    nonces = {first.nonce}
    for i in range(20):
        response = session.respond({"default": str(i)})
        assert response is not None
        assert response.nonce.startswith("n")
        nonces.add(response.nonce)
    assert len(nonces) == 21


# A random conversation: the client ACKs, NACKs, answers stale nonces, reconnects, changes names;
# the content rotates. The session must agree with a simple model of what the client holds.
Step = tuple[str, int]
steps = st.lists(
    st.tuples(st.sampled_from(["ack", "nack", "stale", "rotate", "rename", "reconnect", "same"]), st.integers(0, 3)),
    max_size=40,
)


@given(steps)
def test_sotw_conversation_model(script: list[Step]) -> None:
    content: dict[str, str] = {"default": "v0"}
    session = SotwSession(nonce_prefix="x")
    names: tuple[str, ...] = ("default",)
    session.receive(SotwRequest(names=names))
    sent: list[SotwResponse] = []
    sent_versions: dict[str, dict[str, str]] = {}
    client_version = ""
    pending: SotwResponse | None = None  # the latest response the client has not answered

    def respond() -> None:
        nonlocal pending
        resources = {name: content.get(name, "missing") for name in names}
        demanded = session.awaiting_response
        last = sent_versions.get(sent[-1].nonce) if sent else None
        response = session.respond(resources)
        if demanded or last != resources:
            assert response is not None
            assert response.version == content_version(resources)
            assert response.names == names
            assert response.nonce not in {r.nonce for r in sent}
            sent.append(response)
            sent_versions[response.nonce] = resources
            pending = response
        else:
            assert response is None

    respond()
    for action, arg in script:
        if action == "rotate":
            content["default"] = f"v{arg}"
        elif action in ("ack", "nack") and pending is not None:
            error = REASON if action == "nack" else None
            events = session.receive(
                SotwRequest(
                    names=names,
                    version_info=client_version if error else pending.version,
                    nonce=pending.nonce,
                    error=error,
                )
            )
            if error is None:
                assert events[0] == Acked(version=pending.version, nonce=pending.nonce)
                client_version = pending.version
            else:
                assert isinstance(events[0], Nacked)
                assert events[0].kept_version == client_version
            pending = None
        elif action == "stale" and len(sent) > 1:
            old = sent[arg % (len(sent) - 1)]
            assert session.receive(SotwRequest(names=names, nonce=old.nonce)) == (StaleNonce(nonce=old.nonce),)
        elif action == "rename" and pending is not None:
            names = ("default",) if arg % 2 else ("default", "ROOTCA")
            content.setdefault("ROOTCA", "r")
            session.receive(SotwRequest(names=names, version_info=pending.version, nonce=pending.nonce))
            client_version = pending.version
            pending = None
        elif action == "reconnect":
            session = SotwSession(nonce_prefix=f"r{len(sent)}-")
            events = session.receive(SotwRequest(names=names, version_info=client_version))
            assert isinstance(events[0], Subscribed)
            assert session.accepted_version == client_version
            sent.clear()
            sent_versions.clear()
            pending = None
        respond()
        assert session.accepted_version == client_version


# --- incremental -----------------------------------------------------------------------------------------


def delta_start(request: DeltaRequest, resources: dict[str, str]) -> tuple[DeltaSession, DeltaResponse]:
    session = DeltaSession(nonce_prefix="d")
    session.receive(request)
    response = session.respond(resources)
    assert response is not None
    return session, response


ALL = {"spiffe://example.org/web": "s1", "spiffe://example.org": "b1"}


def test_delta_wildcard_sends_everything_then_changes_only() -> None:
    session, first = delta_start(DeltaRequest(), ALL)
    assert session.wildcard
    assert first.updated == ALL
    assert first.removed == ()
    assert first.system_version == content_version(ALL)
    assert session.receive(DeltaRequest(nonce=first.nonce)) == (Acked(version=first.system_version, nonce=first.nonce),)
    assert session.respond(ALL) is None
    rotated = {**ALL, "spiffe://example.org/web": "s2"}
    pushed = session.respond(rotated)
    assert pushed is not None
    assert pushed.updated == {"spiffe://example.org/web": "s2"}
    assert pushed.removed == ()


def test_delta_star_is_wildcard() -> None:
    session, _ = delta_start(DeltaRequest(subscribe=("*",)), ALL)
    assert session.wildcard
    assert session.names == ()


def test_delta_removed_resources_are_announced_once() -> None:
    session, _ = delta_start(DeltaRequest(), ALL)
    gone = session.respond({"spiffe://example.org": "b1"})
    assert gone is not None
    assert gone.updated == {}
    assert gone.removed == ("spiffe://example.org/web",)
    assert session.respond({"spiffe://example.org": "b1"}) is None


def test_delta_subscribe_and_unsubscribe() -> None:
    session, first = delta_start(DeltaRequest(subscribe=("default",)), {"default": "s1"})
    assert not session.wildcard
    assert first.updated == {"default": "s1"}
    events = session.receive(DeltaRequest(subscribe=("ROOTCA",), nonce=first.nonce))
    assert events == (
        Acked(version=first.system_version, nonce=first.nonce),
        DeltaSubscribed(subscribed=("ROOTCA",), unsubscribed=(), wildcard=False),
    )
    assert session.names == ("default", "ROOTCA")
    added = session.respond({"default": "s1", "ROOTCA": "r1"})
    assert added is not None
    assert added.updated == {"ROOTCA": "r1"}
    events = session.receive(DeltaRequest(unsubscribe=("default",), nonce=added.nonce))
    assert events[1] == DeltaSubscribed(subscribed=(), unsubscribed=("default",), wildcard=False)
    assert session.respond({"ROOTCA": "r1"}) is None  # no removal is sent for what the client dropped
    session.receive(DeltaRequest(subscribe=("default",)))
    again = session.respond({"default": "s1", "ROOTCA": "r1"})
    assert again is not None
    assert again.updated == {"default": "s1"}  # re-subscribed: sent in full


def test_delta_unsubscribing_an_unknown_name_changes_nothing() -> None:
    session, first = delta_start(DeltaRequest(subscribe=("default",)), {"default": "s1"})
    assert session.receive(DeltaRequest(unsubscribe=("ROOTCA",), nonce=first.nonce)) == (
        Acked(version=first.system_version, nonce=first.nonce),
    )


def test_delta_initial_versions_spare_what_the_client_has() -> None:
    request = DeltaRequest(initial_versions={"spiffe://example.org/web": "s1", "spiffe://example.org": "old"})
    session, first = delta_start(request, ALL)
    assert first.updated == {"spiffe://example.org": "b1"}
    assert session.known == ALL


def test_delta_first_response_is_sent_even_when_empty() -> None:
    session, first = delta_start(DeltaRequest(initial_versions=ALL), ALL)
    assert first.updated == {}
    assert first.removed == ()
    assert session.respond(ALL) is None


def test_delta_initial_versions_of_vanished_resources_are_removed() -> None:
    _, first = delta_start(DeltaRequest(initial_versions={"spiffe://other.org": "x"}), ALL)
    assert first.removed == ("spiffe://other.org",)


def test_delta_initial_versions_outside_an_explicit_subscription_are_ignored() -> None:
    session, first = delta_start(
        DeltaRequest(subscribe=("default",), initial_versions={"default": "s1", "ROOTCA": "r"}), {"default": "s1"}
    )
    assert first.updated == {}
    assert first.removed == ()
    assert session.known == {"default": "s1"}


def test_delta_nack_does_not_resend() -> None:
    session, _ = delta_start(DeltaRequest(), ALL)
    rotated = {**ALL, "spiffe://example.org/web": "bad"}
    bad = session.respond(rotated)
    assert bad is not None
    events = session.receive(DeltaRequest(nonce=bad.nonce, error=REASON))
    assert events == (Nacked(version=bad.system_version, nonce=bad.nonce, kept_version="", rejection=REASON),)
    assert session.respond(rotated) is None
    fixed = session.respond({**ALL, "spiffe://example.org/web": "good"})
    assert fixed is not None
    assert fixed.updated == {"spiffe://example.org/web": "good"}


def test_delta_stale_nonce_still_changes_the_subscription() -> None:
    session, first = delta_start(DeltaRequest(subscribe=("default",)), {"default": "s1"})
    session.respond({"default": "s2"})
    events = session.receive(DeltaRequest(subscribe=("ROOTCA",), nonce=first.nonce))
    assert events == (
        StaleNonce(nonce=first.nonce),
        DeltaSubscribed(subscribed=("ROOTCA",), unsubscribed=(), wildcard=False),
    )


def test_delta_wildcard_can_be_left_and_joined() -> None:
    session, first = delta_start(DeltaRequest(subscribe=("*", "default")), {**ALL, "default": "s1"})
    assert session.wildcard
    assert session.names == ("default",)
    events = session.receive(DeltaRequest(unsubscribe=("*",), nonce=first.nonce))
    assert events[-1] == DeltaSubscribed(subscribed=(), unsubscribed=(), wildcard=False)
    assert session.known == {"default": "s1"}
    assert session.respond({"default": "s1"}) is None
    session.receive(DeltaRequest(subscribe=("*",)))
    assert session.wildcard
    back = session.respond({**ALL, "default": "s1"})
    assert back is not None
    assert back.updated == ALL


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([DeltaRequest(nonce="x")], "sds: the first request of a stream must not carry a response nonce"),
        (
            [DeltaRequest(), DeltaRequest(initial_versions={"a": "1"})],
            "sds: initial_resource_versions is only allowed in the first request of a stream",
        ),
        (
            [DeltaRequest(subscribe=("a",), unsubscribe=("a",))],
            "sds: names both subscribed and unsubscribed in one request: ['a']",
        ),
    ],
)
def test_delta_protocol_violations(requests: list[DeltaRequest], message: str) -> None:
    session = DeltaSession()
    for request in requests[:-1]:
        session.receive(request)
    with pytest.raises(ProtocolViolation) as caught:
        session.receive(requests[-1])
    assert str(caught.value) == message


@dataclass
class _Client:
    """What a delta client holds after applying every response."""

    held: dict[str, str] = field(default_factory=dict)

    def apply(self, response: DeltaResponse) -> None:
        for name in response.removed:
            del self.held[name]
        self.held.update(response.updated)


names_strategy = st.sampled_from(["a", "b", "c", "d"])
delta_steps = st.lists(
    st.one_of(
        st.tuples(st.just("sub"), st.lists(names_strategy, max_size=2, unique=True)),
        st.tuples(st.just("unsub"), st.lists(names_strategy, max_size=2, unique=True)),
        st.tuples(st.just("change"), st.dictionaries(names_strategy, st.sampled_from(["1", "2", "3"]))),
    ),
    max_size=30,
)


@given(st.lists(names_strategy, max_size=3, unique=True), delta_steps)
def test_delta_client_converges_to_the_subscribed_resources(
    initial: list[str], script: list[tuple[str, object]]
) -> None:
    """After every response, the client holds exactly the current resources its subscription covers."""
    world: dict[str, str] = {"a": "1", "b": "1"}
    session = DeltaSession()
    client = _Client()
    session.receive(DeltaRequest(subscribe=tuple(initial)))

    def covered() -> dict[str, str]:
        if session.wildcard:
            return dict(world)
        return {name: version for name, version in world.items() if name in session.names}

    def exchange() -> None:
        response = session.respond(covered())
        if response is not None:
            client.apply(response)
            assert response.system_version == content_version(covered())
        # unsubscribed names may linger in the client (it dropped them itself): compare the covered part
        if session.wildcard:
            assert client.held == covered()
        else:
            assert {n: v for n, v in client.held.items() if n in session.names} == covered()

    exchange()
    for action, value in script:
        if action == "change":
            assert isinstance(value, dict)
            world = value
        elif action == "sub":
            assert isinstance(value, list)
            session.receive(DeltaRequest(subscribe=tuple(n for n in value if n not in session.names)))
        else:
            assert isinstance(value, list)
            unsub = tuple(n for n in value if n in session.names)
            session.receive(DeltaRequest(unsubscribe=unsub))
            if not session.wildcard:  # with a wildcard, the resource stays covered and held
                for name in unsub:
                    client.held.pop(name, None)
        exchange()
