"""Fuzz targets of the protocol machines: each pre-auth machine and backend dialogue, the
shared line and literal readers, SMTP replies and XCLIENT (see tests/fuzz/targets.py)."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

from stalroute.protocols import imap, managesieve, passthrough, pop3, submission
from stalroute.protocols.base import (
    MAX_PREAUTH_LINE,
    Authenticate,
    BackendError,
    BackendReady,
    BackendSend,
    BackendSettings,
    BackendStartTLS,
    Close,
    ForwardingInfo,
    LoginFailed,
    LoginSucceeded,
    PreAuthSettings,
    ProtocolSpec,
    Reply,
    StartTLS,
)
from stalroute.protocols.lines import (
    SYNC_LITERAL,
    ArgumentError,
    CapabilityLines,
    LiteralAssembler,
    ProtocolViolation,
    Unit,
)
from stalroute.protocols.smtpreply import ReplyReader, ehlo_keywords
from stalroute.protocols.xclient import advertised_attributes, xclient_command
from stalroute.sasl import MECHANISMS
from tests.fuzz.harness import (
    RETAINED_LIMIT,
    Input,
    assert_clean_lines,
    check_credentials,
    chunks,
    retained,
)

# --- pre-auth machines --------------------------------------------------------------------------

_TLS_MODES = ("implicit", "starttls", "plain")
#: Each protocol's own capability settings: the defaults, and a variant.
_CAPABILITIES: dict[str, list[Any]] = {
    "imap": [imap.IMAPCapabilities(), imap.IMAPCapabilities(advertise=("IMAP4rev1", "ID"))],
    "pop3": [pop3.POP3Capabilities(), pop3.POP3Capabilities(utf8=False)],
    "managesieve": [managesieve.SieveCapabilities(),
                    managesieve.SieveCapabilities(sieve=("fileinto", "enotify"),
                                                  implementation="fuzz", notify=("mailto",))],
    "submission": [submission.SubmissionCapabilities(),
                   submission.SubmissionCapabilities(ehlo=("PIPELINING", "SIZE 1000"))],
}
#: How an outcome's reply looks, per protocol (what a backend said, relayed).
_REFUSAL = {"imap": b"a NO [AUTHENTICATIONFAILED] no\r\n", "pop3": b"-ERR no\r\n",
            "managesieve": b'NO "no"\r\n', "submission": b"535 5.7.8 no\r\n"}


def _check_preauth_events(events: list, max_reply: int) -> None:
    for event in events:
        assert isinstance(event, (Reply, Authenticate, StartTLS, Close)), event
        if isinstance(event, Reply):
            assert 0 < len(event.data) <= max_reply
            assert_clean_lines(event.data)
        elif isinstance(event, Authenticate):
            check_credentials(event.credentials)
    closes = [index for index, event in enumerate(events) if isinstance(event, Close)]
    assert not closes or closes == [len(events) - 1]
    assert sum(isinstance(event, Authenticate) for event in events) <= 1


def _preauth_target(spec: ProtocolSpec) -> Callable[[bytes], None]:
    name = spec.name
    max_reply = 4096

    def target(data: bytes) -> None:
        inp = Input(data)
        settings = PreAuthSettings(
            hostname="mx.example.com", tls_mode=inp.choice(_TLS_MODES),
            sasl=inp.subset(MECHANISMS) or MECHANISMS, allow_plain_auth_without_tls=inp.flag(),
            banner=inp.choice(["ready", "x" * 300, "bad\tbanner ü"]),
            max_auth_attempts=1 + inp.byte() % 3,
            capabilities=inp.choice(_CAPABILITIES[name]))
        decisions = inp.take(8) or b"\x00"
        interactive = inp.flag()
        payload = inp.rest()
        pieces = chunks(Input(decisions), payload)
        machine = spec.preauth(settings)
        _check_preauth_events(machine.greeting(), max_reply)
        if not interactive:
            # Split-independence: the same bytes give the same events, however they arrive.
            whole = spec.preauth(settings)
            whole.greeting()
            expected = whole.receive(b"".join(pieces))
            _check_preauth_events(expected, max_reply)
            got = []
            for piece in pieces:
                got += machine.receive(piece)
                assert retained(machine) <= RETAINED_LIMIT
            assert got == expected
            return
        step = 0
        for piece in pieces:
            events = machine.receive(piece)
            while True:
                _check_preauth_events(events, max_reply)
                if any(isinstance(event, Close) for event in events):
                    return  # the session drops the machine and whatever it holds
                assert retained(machine) <= RETAINED_LIMIT
                reaction = decisions[step % len(decisions)]
                step += 1
                if any(isinstance(event, Authenticate) for event in events):
                    if reaction % 3 == 0:
                        machine.auth_succeeded()
                        return
                    events = (machine.auth_failed(_REFUSAL[name]) if reaction % 3 == 1
                              else machine.auth_unavailable("backend down"))
                elif any(isinstance(event, StartTLS) for event in events):
                    events = machine.tls_started()
                else:
                    break
        _check_preauth_events(machine.timed_out(), max_reply)

    target.__name__ = target.__qualname__ = f"fuzz_preauth_{name}"
    target.__doc__ = f"{name} pre-auth machine: no exception, well-formed bounded replies."
    return target


fuzz_preauth_imap = _preauth_target(imap.SPEC)
fuzz_preauth_pop3 = _preauth_target(pop3.SPEC)
fuzz_preauth_managesieve = _preauth_target(managesieve.SPEC)
fuzz_preauth_submission = _preauth_target(submission.SPEC)


# --- backend dialogues ----------------------------------------------------------------------------

_FORWARDING = ForwardingInfo(client_ip="2001:db8::7", client_port=51000, local_ip="192.0.2.1",
                             local_port=993, session_id="1-abcdef", ttl=5, client_tls=True)
#: A client login per protocol, to obtain the context its dialogue replays.
_LOGINS = {
    "imap": b"a1 LOGIN alice secret\r\n",
    "pop3": b"USER alice\r\nPASS secret\r\n",
    "managesieve": b'AUTHENTICATE "PLAIN" "' + base64.b64encode(b"\0alice\0secret") + b'"\r\n',
    "submission": b"EHLO client.example\r\nAUTH PLAIN "
                  + base64.b64encode(b"\0alice\0secret") + b"\r\n",
}
_TERMINAL = (LoginSucceeded, LoginFailed, BackendError)


def _login_of(spec: ProtocolSpec) -> Authenticate | None:
    if spec.passthrough:
        return None
    machine = spec.preauth(PreAuthSettings(
        hostname="mx.example.com", tls_mode="implicit", sasl=MECHANISMS,
        allow_plain_auth_without_tls=True, banner="ready",
        capabilities=_CAPABILITIES[spec.name][0]))
    machine.greeting()
    found = [event for event in machine.receive(_LOGINS[spec.name])
             if isinstance(event, Authenticate)]
    assert len(found) == 1, spec.name
    return found[0]


def _check_backend_events(events: list) -> None:
    for event in events:
        assert isinstance(event, (BackendSend, BackendStartTLS, BackendReady, *_TERMINAL)), event
        if isinstance(event, BackendSend):
            assert_clean_lines(event.data)
        elif isinstance(event, (LoginSucceeded, LoginFailed)) and event.reply:
            assert len(event.reply) <= 2 * MAX_PREAUTH_LINE
    terminal = [index for index, event in enumerate(events) if isinstance(event, _TERMINAL)]
    assert not terminal or terminal == [len(events) - 1]


def _backend_target(spec: ProtocolSpec) -> Callable[[bytes], None]:
    login = _login_of(spec)

    def target(data: bytes) -> None:
        inp = Input(data)
        settings = BackendSettings(
            tls_mode=inp.choice(_TLS_MODES), forwarding=inp.choice([None, _FORWARDING]),
            hide_auth_errors=inp.flag(),
            ehlo_name=inp.choice(["proxy.example", "bad name\r\nRSET", "ü"]),
            learn_capabilities=inp.flag())
        decisions = inp.take(8) or b"\x00"
        pieces = chunks(Input(decisions), inp.rest())
        dialogue = spec.dialogue(settings)
        events = dialogue.connected()
        for piece in pieces:
            events = events + dialogue.receive(piece)
            while True:
                _check_backend_events(events)
                if any(isinstance(event, _TERMINAL) for event in events):
                    return  # the session drops the dialogue and whatever it holds
                assert retained(dialogue) <= RETAINED_LIMIT
                if any(isinstance(event, BackendStartTLS) for event in events):
                    events = dialogue.tls_started()
                elif any(isinstance(event, BackendReady) for event in events):
                    offered = dialogue.offered
                    assert offered is None or all(
                        isinstance(words, frozenset) for words in offered.values())
                    events = dialogue.login(login.credentials if login else None,
                                            login.context if login else None)
                else:
                    events = []
                    break

    target.__name__ = target.__qualname__ = f"fuzz_backend_{spec.name}"
    target.__doc__ = f"{spec.name} backend dialogue: no exception, clean commands, one outcome."
    return target


fuzz_backend_imap = _backend_target(imap.SPEC)
fuzz_backend_pop3 = _backend_target(pop3.SPEC)
fuzz_backend_managesieve = _backend_target(managesieve.SPEC)
fuzz_backend_submission = _backend_target(submission.SPEC)
fuzz_backend_smtp_passthrough = _backend_target(passthrough.SMTP)
fuzz_backend_lmtp_passthrough = _backend_target(passthrough.LMTP)


# --- shared line helpers ------------------------------------------------------------------------


def fuzz_lines(data: bytes) -> None:
    """LineBuffer, literal assembly, argument parsing, SMTP replies: only ProtocolViolation
    (and ArgumentError from argument parsing); nothing held beyond the limits."""
    inp = Input(data)
    limit = inp.choice([16, 200, 4096])
    synchronising = inp.flag()
    decisions = inp.take(4) or b"\x00"
    pieces = chunks(Input(decisions), inp.rest(), limit)
    assembler = LiteralAssembler(limit, synchronising)
    replies = ReplyReader(limit)
    capabilities = CapabilityLines()
    try:
        for index, piece in enumerate(pieces):
            assembler.buffer.feed(piece)
            while (unit := assembler.poll()) is not None:
                if unit is SYNC_LITERAL:
                    (assembler.accept if decisions[index % len(decisions)] & 1
                     else assembler.drop)()
                    continue
                assert isinstance(unit, Unit) and unit.size <= limit
                arguments = unit.arguments()
                try:
                    while not arguments.at_end():
                        if arguments.at_string():
                            arguments.string()
                        else:
                            arguments.word(re.compile(rb"[^ ]+"))
                        if not arguments.at_end():
                            arguments.space()
                    arguments.end()
                except ArgumentError:
                    pass
            assert len(assembler.buffer) <= 2 * limit + 2
    except ProtocolViolation:
        pass
    try:
        for piece in pieces:
            replies.feed(piece)
            while (reply := replies.next_reply()) is not None:
                assert 200 <= reply.code <= 599 and len(reply.raw) <= limit
                ehlo_keywords(reply)
                capabilities.add(reply.raw)
            assert len(replies.buffer) <= limit + 1 and len(replies._raw) <= limit
    except ProtocolViolation:
        pass


def fuzz_xclient(data: bytes) -> None:
    """XCLIENT building from client-given values: one clean ASCII line or nothing."""
    inp = Input(data)
    helo = inp.sized().decode("utf-8", "replace") or None
    info = ForwardingInfo(client_ip=inp.choice(["192.0.2.7", "::ffff:192.0.2.7", "2001:db8::1",
                                                inp.sized().decode("utf-8", "replace")]),
                          client_port=inp.number(65536), local_ip="192.0.2.1",
                          local_port=inp.number(65536),
                          session_id=inp.sized().decode("utf-8", "replace"),
                          ttl=inp.byte(), client_tls=inp.flag())
    advertised = inp.choice([None, advertised_attributes(inp.rest().split())])
    for smtp in (True, False):
        command = xclient_command(info, advertised, smtp=smtp, helo=helo, proto="ESMTP")
        if command is not None:
            assert command.startswith(b"XCLIENT ") and command.isascii()
            assert b"\r" not in command and b"\n" not in command and b"\x00" not in command
            for pair in command.split(b" ")[1:]:
                name, equals, value = pair.partition(b"=")
                assert equals and name and value and b"=" not in value
