"""SMTP/LMTP pass-through machines (sans-IO)."""

from __future__ import annotations

from stalroute.protocols.base import (
    MAX_PREAUTH_LINE, BackendError, BackendReady, BackendSend, BackendSettings, ForwardingInfo,
    LoginSucceeded,
)
from stalroute.protocols.passthrough import LMTPPassthroughBackend, PassthroughBackend

CLIENT = ForwardingInfo(client_ip="192.0.2.7", client_port=40000, local_ip="198.51.100.1",
                        local_port=25, session_id="1-abc", ttl=6)


def settings(forwarding: ForwardingInfo | None = None) -> BackendSettings:
    return BackendSettings(tls_mode="plain", forwarding=forwarding, ehlo_name="mx.proxy.test")


def test_without_forwarding_the_first_bytes_make_it_ready_and_are_relayed() -> None:
    backend = PassthroughBackend(settings())
    assert backend.receive(b"220 mx ESMTP\r\n") == [BackendReady()]
    assert backend.receive(b"more") == []
    assert backend.login(None, None) == [LoginSucceeded(b"")]
    assert backend.leftover == b"220 mx ESMTP\r\nmore"


def test_xclient_is_sent_and_the_fresh_greeting_goes_to_the_client() -> None:
    backend = PassthroughBackend(settings(CLIENT))
    assert backend.receive(b"220 mx ESMTP first\r\n") == [BackendSend(b"EHLO mx.proxy.test\r\n")]
    [send] = backend.receive(b"250-mx\r\n250-XCLIENT ADDR PORT NAME LOGIN\r\n250 8BITMIME\r\n")
    assert send == BackendSend(b"XCLIENT ADDR=192.0.2.7 PORT=40000\r\n")
    assert backend.receive(b"220 mx ESMTP again\r\n") == [BackendReady()]
    assert backend.leftover == b"220 mx ESMTP again\r\n"


def test_a_backend_without_xclient_gets_the_original_greeting_relayed() -> None:
    backend = LMTPPassthroughBackend(settings(CLIENT))
    assert backend.receive(b"220 lmtp ready\r\n") == [BackendSend(b"LHLO mx.proxy.test\r\n")]
    assert backend.receive(b"250-lmtp\r\n250 PIPELINING\r\n") == [BackendReady()]
    assert backend.leftover == b"220 lmtp ready\r\n"


def test_a_refusing_greeting_is_relayed_and_a_refused_xclient_is_an_error() -> None:
    refusing = PassthroughBackend(settings(CLIENT))
    assert refusing.receive(b"554 go away\r\n") == [BackendReady()]
    assert refusing.leftover == b"554 go away\r\n"
    backend = PassthroughBackend(settings(CLIENT))
    backend.receive(b"220 mx\r\n")
    backend.receive(b"250-mx\r\n250 XCLIENT ADDR\r\n")
    [error] = backend.receive(b"550 not authorized\r\n")
    assert isinstance(error, BackendError)
    [error] = PassthroughBackend(settings(CLIENT)).receive(b"garbage\r\n")
    assert isinstance(error, BackendError)


def test_an_over_long_backend_reply_while_announcing_the_client_is_a_backend_error() -> None:
    """Too long for the reply reader: a backend error (the client gets a temporary failure),
    never an exception out of the dialogue."""
    for hello in (b"250-mx\r\n250 " + b"X" * MAX_PREAUTH_LINE + b"\r\n",  # a line too long
                  (b"250-" + b"X" * 1000 + b"\r\n") * (MAX_PREAUTH_LINE // 1000 + 1)):  # a reply
        backend = PassthroughBackend(settings(CLIENT))
        backend.receive(b"220 mx ESMTP\r\n")
        [error] = backend.receive(hello)
        assert isinstance(error, BackendError) and "too long" in error.reason, error
    greeting = LMTPPassthroughBackend(settings(CLIENT))  # before any complete line
    [error] = greeting.receive(b"220 " + b"x" * (MAX_PREAUTH_LINE + 10))
    assert isinstance(error, BackendError) and "too long" in error.reason
