"""stalroute.protocols.managesieve: the pre-auth machine and the backend dialogue (sans-IO).

Also covers the literal and string handling shared with IMAP in
:mod:`stalroute.protocols.lines`.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from stalroute.config import DEFAULT_SIEVE_EXTENSIONS
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
    Reply,
    StartTLS,
)
from stalroute.protocols.linebased import MAX_BAD_COMMANDS
from stalroute.protocols.lines import (
    MAX_CAPABILITY_BYTES,
    MAX_CAPABILITY_LINES,
    SYNC_LITERAL,
    ArgumentError,
    LineTooLong,
    LiteralAssembler,
    Unit,
    quote,
    safe_text,
)
from stalroute.protocols.managesieve import (
    SPEC,
    ManageSieveBackendDialogue,
    ManageSievePreAuth,
    SieveCapabilities,
)
from stalroute.sasl import MECHANISMS, Credentials, decode_oauthbearer, plain_credentials
from tests.unit.preauth_checks import assert_well_formed, authenticates, split

PASSWORD = "s3cr3t"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def make_settings(tls_mode: str = "starttls", sasl: tuple[str, ...] = MECHANISMS,
                  allow: bool = False, max_auth_attempts: int = 3, banner: str = "ready",
                  sieve: tuple[str, ...] = ("fileinto", "vacation"),
                  implementation: str = "stalroute test") -> PreAuthSettings[SieveCapabilities]:
    return PreAuthSettings(hostname="mx.example.com", tls_mode=tls_mode, sasl=sasl,
                           allow_plain_auth_without_tls=allow, banner=banner,
                           capabilities=SieveCapabilities(sieve=sieve,
                                                          implementation=implementation),
                           max_auth_attempts=max_auth_attempts)


def machine(**kwargs) -> ManageSievePreAuth:
    m = ManageSievePreAuth(make_settings(**kwargs))
    m.greeting()
    return m


def tls_machine(**kwargs) -> ManageSievePreAuth:
    return machine(tls_mode="implicit", **kwargs)


def caps(sasl: bytes, starttls: bool) -> bytes:
    return (b'"IMPLEMENTATION" "stalroute test"\r\n"SASL" "' + sasl + b'"\r\n'
            b'"SIEVE" "fileinto vacation"\r\n' + (b'"STARTTLS"\r\n' if starttls else b"")
            + b'"VERSION" "1.0"\r\n')


def test_spec_names_the_machines():
    assert (SPEC.name, SPEC.preauth, SPEC.dialogue) == (
        "managesieve", ManageSievePreAuth, ManageSieveBackendDialogue)


# --- shared literal handling (lines.py) -----------------------------------------------------


def test_literal_assembler_non_synchronising_reads_both_forms():
    assembler = LiteralAssembler(100, synchronising=False)
    assembler.buffer.feed(b'A {3}\r\nabc "x" {2+}\r\nde\r\nB\r\n')
    unit = assembler.poll()
    assert isinstance(unit, Unit)
    assert unit.texts == [b"A ", b' "x" ', b""] and unit.literals == [b"abc", b"de"]
    assert bytes(unit.raw) == b'A {3}\r\nabc "x" {2+}\r\nde\r\n'
    arguments = unit.arguments()
    assert arguments.word(__import__("re").compile(rb"[A-Z]+")) == b"A"
    arguments.space()
    assert arguments.at_string() and arguments.string() == b"abc"
    arguments.space()
    assert arguments.string() == b"x"
    arguments.space()
    assert arguments.string() == b"de"
    arguments.end()
    assert assembler.poll().texts == [b"B"]
    assert assembler.poll() is None


def test_literal_assembler_synchronising_and_limits():
    assembler = LiteralAssembler(10, synchronising=True)
    assembler.buffer.feed(b"A {3}\r\n")
    assert assembler.poll() is SYNC_LITERAL
    assembler.accept()
    assembler.buffer.feed(b"abc\r\n")
    assert assembler.poll().literals == [b"abc"]
    assembler.buffer.feed(b"A {9}\r\n")
    with pytest.raises(LineTooLong):
        assembler.poll()
    assembler.reset()
    assembler.buffer.feed(b"ok\r\n")
    assert assembler.poll().texts == [b"ok"]


def test_strings_and_quoting():
    unit = Unit(texts=[b'"a\\"b\\\\c" "unterminated'], literals=[])
    arguments = unit.arguments()
    assert arguments.string() == b'a"b\\c'
    arguments.space()
    with pytest.raises(ArgumentError):
        arguments.string()
    assert quote('a"b\\') == b'"a\\"b\\\\"'
    with pytest.raises(ValueError):
        quote("a\r\nb")
    assert safe_text("x\ty" + "z" * 300, "f") == b"x?y" + b"z" * 197
    assert safe_text("  ", "fallback") == b"fallback"


# --- greeting and capabilities --------------------------------------------------------------


def test_greeting_before_tls_on_a_starttls_listener():
    m = ManageSievePreAuth(make_settings())
    assert m.tls_active is False
    assert m.greeting() == [Reply(caps(b"OAUTHBEARER XOAUTH2", True) + b'OK "ready"\r\n')]


def test_greeting_over_tls_and_defaults():
    m = ManageSievePreAuth(make_settings(tls_mode="implicit", banner='say "hi"\r\n'))
    assert m.greeting() == [Reply(caps(b"PLAIN LOGIN OAUTHBEARER XOAUTH2", False)
                                  + b'OK "say \\"hi\\"??"\r\n')]
    bare = ManageSievePreAuth(PreAuthSettings(
        hostname="h", tls_mode="plain", sasl=("PLAIN",), allow_plain_auth_without_tls=False,
        banner="", capabilities=SieveCapabilities()))
    greeting = bare.greeting()[0].data
    assert greeting.startswith(b'"IMPLEMENTATION" "stalroute"\r\n"SASL" ""\r\n"SIEVE" "'
                               + " ".join(DEFAULT_SIEVE_EXTENSIONS).encode() + b'"\r\n')
    assert greeting.endswith(b'"VERSION" "1.0"\r\nOK "Ready."\r\n')


def test_enotify_is_advertised_with_its_notify_methods():
    """RFC 5804 §1.7: with "enotify" in SIEVE, NOTIFY MUST list the notification methods."""
    def capability_lines(**own: tuple[str, ...]) -> list[bytes]:
        settings = PreAuthSettings(hostname="h", tls_mode="implicit", sasl=("PLAIN",),
                                   allow_plain_auth_without_tls=False, banner="",
                                   capabilities=SieveCapabilities(**own))
        return ManageSievePreAuth(settings).capability_block().splitlines()

    assert b'"NOTIFY" "mailto"' in capability_lines()  # the default list has enotify
    assert b'"NOTIFY" "mailto"' in capability_lines(sieve=("fileinto", "enotify"))
    assert b'"NOTIFY" "xmpp mailto"' in capability_lines(sieve=("enotify",),
                                                        notify=("xmpp", "mailto"))
    without = capability_lines(sieve=("fileinto", "vacation"), notify=("mailto",))
    assert not any(line.startswith(b'"NOTIFY"') for line in without)


def test_capability_noop_logout():
    m = machine()
    assert m.receive(b"capability\r\n") == [
        Reply(caps(b"OAUTHBEARER XOAUTH2", True) + b'OK "Capability completed."\r\n')]
    assert m.receive(b"NOOP\r\n") == [Reply(b'OK "Done"\r\n')]
    assert m.receive(b'NOOP "STARTTLS-SYNC-42"\r\n') == [
        Reply(b'OK (TAG "STARTTLS-SYNC-42") "Done"\r\n')]
    assert m.receive(b'noop {3+}\r\na"b\r\n') == [Reply(b'OK (TAG "a\\"b") "Done"\r\n')]
    assert m.receive(b"NOOP {3}\r\na\r\n\r\n") == [Reply(b'OK (TAG {3}\r\na\r\n) "Done"\r\n')]
    assert m.receive(b"LOGOUT\r\nNOOP\r\n") == [Reply(b'OK "Logout completed."\r\n'), Close()]
    assert m.receive(b"NOOP\r\n") == []


@pytest.mark.parametrize("line, reply", [
    (b"PUTSCRIPT \"x\" {3+}\r\nabc\r\n", b'NO "Command not allowed before authentication."\r\n'),
    (b"LISTSCRIPTS\r\n", b'NO "Command not allowed before authentication."\r\n'),
    (b"\r\n", b'NO "Invalid command."\r\n'),
    (b'"NOOP"\r\n', b'NO "Invalid command."\r\n'),
    (b"CAPABILITY x\r\n", b'NO "Invalid arguments."\r\n'),
    (b"NOOP atom\r\n", b'NO "Invalid arguments."\r\n'),
    (b'NOOP "a" "b"\r\n', b'NO "Invalid arguments."\r\n'),
    (b"NOOP {1025+}\r\n" + b"x" * 1025 + b"\r\n", b'NO "Invalid arguments."\r\n'),
    (b"LOGOUT now\r\n", b'NO "Invalid arguments."\r\n'),
    (b'AUTHENTICATE PLAIN\r\n', b'NO "Invalid arguments."\r\n'),
    (b'AUTHENTICATE "PLAIN" "x" "y"\r\n', b'NO "Invalid arguments."\r\n'),
    (b'AUTHENTICATE\r\n', b'NO "Invalid arguments."\r\n'),
])
def test_refusals(line, reply):
    assert tls_machine().receive(line) == [Reply(reply)]


def test_too_many_bad_commands_close_the_connection():
    events = machine().receive(b"FOO\r\n" * (MAX_BAD_COMMANDS + 5))
    assert events[-2:] == [Reply(b'BYE "Too many invalid commands."\r\n'), Close()]
    assert len(events) == MAX_BAD_COMMANDS + 2


# --- STARTTLS -------------------------------------------------------------------------------


def test_starttls_discards_injected_bytes_and_resends_capabilities():
    m = machine()
    events = m.receive(b'STARTTLS\r\nAUTHENTICATE "PLAIN" "injected"\r\n')
    assert events == [Reply(b'OK "Begin TLS negotiation now."\r\n'), StartTLS()]
    assert m.receive(b"NOOP\r\n") == []
    assert m.tls_started() == [Reply(caps(b"PLAIN LOGIN OAUTHBEARER XOAUTH2", False)
                                     + b'OK "TLS negotiation successful."\r\n')]
    assert m.tls_active is True
    assert m.receive(b"STARTTLS\r\n") == [Reply(b'NO "TLS is already active."\r\n')]


def test_starttls_not_offered_on_a_plain_listener():
    assert machine(tls_mode="plain").receive(b"STARTTLS\r\n") == [
        Reply(b'NO "STARTTLS not available."\r\n')]


def test_starttls_partial_literal_is_discarded():
    m = machine()
    m.receive(b"STARTTLS\r\nNOOP {10+}\r\nabc")
    m.tls_started()
    assert m.receive(b"NOOP\r\n") == [Reply(b'OK "Done"\r\n')]


# --- AUTHENTICATE ---------------------------------------------------------------------------


def test_authenticate_plain_with_quoted_initial_response():
    m = tls_machine()
    events = m.receive(b'AUTHENTICATE "PLAIN" "' + b64(b"\0alice\0" + PASSWORD.encode())
                       + b'"\r\n')
    assert events == [Authenticate(plain_credentials("alice", PASSWORD))]


def test_authenticate_with_literal_initial_response_and_mechanism():
    ir = b64(b"\0alice\0" + PASSWORD.encode())
    m = tls_machine()
    events = m.receive(b"AUTHENTICATE {5+}\r\nplain {%d}\r\n" % len(ir) + ir + b"\r\n")
    assert authenticates(events) == [Authenticate(plain_credentials("alice", PASSWORD))]


def test_authenticate_plain_with_continuation():
    m = tls_machine()
    assert m.receive(b'AUTHENTICATE "PLAIN"\r\n') == [Reply(b'""\r\n')]
    response = b64(b"\0alice\0pw")
    events = m.receive(b"{%d+}\r\n" % len(response) + response + b"\r\n")
    assert authenticates(events)[0].credentials.login == "alice"


def test_authenticate_login_prompts_with_quoted_responses():
    m = tls_machine()
    assert m.receive(b'AUTHENTICATE "LOGIN"\r\n') == [Reply(b'"VXNlcm5hbWU6"\r\n')]
    assert m.receive(b'"' + b64(b"alice") + b'"\r\n') == [Reply(b'"UGFzc3dvcmQ6"\r\n')]
    assert m.receive(b'"' + b64(PASSWORD.encode()) + b'"\r\n') == [
        Authenticate(plain_credentials("alice", PASSWORD))]


def test_authenticate_abort_is_not_counted():
    m = tls_machine(max_auth_attempts=1)
    m.receive(b'AUTHENTICATE "PLAIN"\r\n')
    assert m.receive(b'"*"\r\n') == [Reply(b'NO "Authentication aborted."\r\n')]
    assert m.receive(b"NOOP\r\n") == [Reply(b'OK "Done"\r\n')]


@pytest.mark.parametrize("response, reply", [
    (b"bare\r\n", b'NO "Invalid SASL response"\r\n'),
    (b'"a" "b"\r\n', b'NO "Invalid SASL response"\r\n'),
    (b'"!!"\r\n', b'NO "Invalid base64 data"\r\n'),
])
def test_malformed_sasl_responses_are_counted(response, reply):
    m = tls_machine(max_auth_attempts=1)
    m.receive(b'AUTHENTICATE "PLAIN"\r\n')
    assert m.receive(response) == [Reply(reply), Reply(
        b'BYE "Too many invalid authentication attempts."\r\n'), Close()]


def test_authenticate_oauthbearer_without_tls():
    response = b"n,a=user@example.com,\x01auth=Bearer tok\x01\x01"
    events = machine().receive(b'AUTHENTICATE "OAUTHBEARER" "' + b64(response) + b'"\r\n')
    assert events == [Authenticate(decode_oauthbearer(response))]


@pytest.mark.parametrize("command, reply", [
    (b'AUTHENTICATE "PLAIN"\r\n',
     b'NO (ENCRYPT-NEEDED) "Cleartext authentication is not allowed without TLS."\r\n'),
    (b'AUTHENTICATE "login" "YQ=="\r\n',
     b'NO (ENCRYPT-NEEDED) "Cleartext authentication is not allowed without TLS."\r\n'),
    (b'AUTHENTICATE "CRAM-MD5"\r\n', b'NO "Unsupported authentication mechanism."\r\n'),
    (b'AUTHENTICATE "XOAUTH2"\r\n', b'NO "Unsupported authentication mechanism."\r\n'),
])
def test_authenticate_refusals(command, reply):
    assert machine(sasl=("PLAIN", "LOGIN", "OAUTHBEARER")).receive(command) == [Reply(reply)]


def test_plain_allowed_without_tls_by_override():
    m = machine(tls_mode="plain", allow=True)
    assert m.receive(b'AUTHENTICATE "PLAIN"\r\n') == [Reply(b'""\r\n')]


# --- outcomes, limits -----------------------------------------------------------------------


def test_pipelined_bytes_are_held_then_handed_over():
    m = tls_machine()
    events = m.receive(b'AUTHENTICATE "PLAIN" "' + b64(b"\0a\0b") + b'"\r\nLISTSCRIPTS\r\n')
    assert len(events) == 1 and authenticates(events)
    assert m.receive(b'GETSCRIPT "x"\r\n') == []
    assert m.auth_succeeded() == b'LISTSCRIPTS\r\nGETSCRIPT "x"\r\n'


def test_auth_failed_counts_and_resumes():
    m = tls_machine(max_auth_attempts=2)
    m.receive(b'AUTHENTICATE "PLAIN" "' + b64(b"\0a\0b") + b'"\r\nNOOP\r\n')
    assert m.auth_failed(b'NO "nope"\r\n') == [Reply(b'NO "nope"\r\n'), Reply(b'OK "Done"\r\n')]
    m.receive(b'AUTHENTICATE "PLAIN" "' + b64(b"\0a\0b") + b'"\r\n')
    assert m.auth_failed(b'NO "nope"\r\n') == [
        Reply(b'NO "nope"\r\n'), Reply(b'BYE "Too many invalid authentication attempts."\r\n'),
        Close()]


def test_auth_unavailable_is_trylater():
    m = tls_machine(max_auth_attempts=1)
    for _ in range(2):
        m.receive(b'AUTHENTICATE "PLAIN" "' + b64(b"\0a\0b") + b'"\r\n')
        assert m.auth_unavailable('backend "down"') == [
            Reply(b'NO (TRYLATER) "backend \\"down\\""\r\n')]


def test_limits_and_timeout():
    m = machine()
    assert m.receive(b"NOOP " + b"x" * MAX_PREAUTH_LINE) == [
        Reply(b'BYE "Line too long."\r\n'), Close()]
    m = machine()
    assert m.receive(b"NOOP {%d+}\r\n" % (MAX_PREAUTH_LINE + 1))[-1] == Close()
    m = machine()
    assert m.timed_out() == [Reply(b'BYE "Disconnected for inactivity."\r\n'), Close()]
    m = tls_machine()
    m.receive(b'AUTHENTICATE "PLAIN" "' + b64(b"\0a\0b") + b'"\r\n')
    assert m.receive(b"x" * (MAX_PREAUTH_LINE + 1)) == [
        Reply(b'BYE "Too much input before authentication completed."\r\n'), Close()]


# --- properties -----------------------------------------------------------------------------


def sieve_string(value: bytes, style: int) -> bytes:
    if style == 0:
        return b'"' + value + b'"'
    return b"{%d%s}\r\n" % (len(value), b"+" if style == 1 else b"") + value


login_fields = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"),
                       min_size=1, max_size=12)


@given(login_fields, login_fields, st.integers(0, 2), st.integers(0, 2), st.booleans(),
       st.lists(st.integers(0, 10_000), max_size=8))
def test_login_split_anywhere_gives_the_same_events(user, password, style_m, style_r,
                                                    continuation, cuts):
    response = b64(b"\0" + user.encode() + b"\0" + password.encode())
    command = b"AUTHENTICATE " + sieve_string(b"PLAIN", style_m)
    if continuation:
        script = command + b"\r\n" + sieve_string(response, style_r) + b"\r\n"
    else:
        script = command + b" " + sieve_string(response, style_r) + b"\r\n"
    script = b'NOOP "t"\r\nCAPABILITY\r\n' + script + b"LISTSCRIPTS\r\n"
    whole_machine = tls_machine()
    whole = whole_machine.receive(script)
    chunked_machine = tls_machine()
    chunked = []
    for chunk in split(script, cuts):
        chunked += chunked_machine.receive(chunk)
    assert chunked == whole
    assert authenticates(whole) == [Authenticate(plain_credentials(user, password))]
    assert chunked_machine.auth_succeeded() == b"LISTSCRIPTS\r\n"


command_words = st.sampled_from([
    b"AUTHENTICATE", b'"PLAIN"', b'"LOGIN"', b"CAPABILITY", b"STARTTLS", b"NOOP", b"LOGOUT",
    b" ", b"\r\n", b"\n", b'"', b"\\", b"{3}", b"{2+}", b"{70000+}", b'"*"', b'"AGFAYg=="',
    b'""', b"\x00", b"\xff", b"PUTSCRIPT",
])


@hypothesis_settings(max_examples=300)
@given(st.one_of(st.binary(max_size=400), st.lists(command_words, max_size=60).map(b"".join)),
       st.lists(st.integers(0, 10_000), max_size=6), st.sampled_from(["starttls", "implicit"]))
def test_random_input_is_bounded_and_split_independent(data, cuts, tls_mode):
    whole = machine(tls_mode=tls_mode).receive(data)
    chunked_machine = machine(tls_mode=tls_mode)
    chunked = []
    for chunk in split(data, cuts):
        chunked += chunked_machine.receive(chunk)
        assert len(chunked_machine._buffer) <= MAX_PREAUTH_LINE + 1
    assert chunked == whole
    assert_well_formed(whole, max_reply=2048)


@hypothesis_settings(max_examples=50)
@given(st.binary(min_size=1, max_size=5000), st.integers(1, 3000))
def test_large_random_input_never_overflows_the_buffer(data, chunk_size):
    m = tls_machine()
    stream = data * 40
    for offset in range(0, len(stream), chunk_size):
        m.receive(stream[offset:offset + chunk_size])
        assert len(m._buffer) <= MAX_PREAUTH_LINE + 1
        if m._state in ("closed", "pending"):
            break


# --- backend dialogue -----------------------------------------------------------------------

FORWARDING = ForwardingInfo(client_ip="192.0.2.10", client_port=51000, local_ip="198.51.100.1",
                            local_port=4190, session_id="1-abcdef", ttl=6)
XCLIENT = b"XCLIENT ADDR=192.0.2.10 PORT=51000 SESSION=1-abcdef TTL=6\r\n"
DOVECOT_CAPS = (b'"IMPLEMENTATION" "Dovecot (Debian) Pigeonhole"\r\n'
                b'"SIEVE" "fileinto reject envelope"\r\n"NOTIFY" "mailto"\r\n'
                b'"SASL" "PLAIN LOGIN"\r\n"STARTTLS"\r\n"VERSION" "1.0"\r\n"XCLIENT"\r\n')
CREDS = plain_credentials("alice", PASSWORD)
AUTHENTICATE = b'AUTHENTICATE "PLAIN" "' + b64(CREDS.response) + b'"\r\n'
HIDDEN = b'NO "Authentication failed."\r\n'


def dialogue(tls_mode: str = "implicit", forwarding: ForwardingInfo | None = None,
             hide: bool = False) -> ManageSieveBackendDialogue:
    return ManageSieveBackendDialogue(BackendSettings(tls_mode=tls_mode, forwarding=forwarding,
                                                      hide_auth_errors=hide))


def ready(**kwargs) -> ManageSieveBackendDialogue:
    d = dialogue(**kwargs)
    assert d.receive(b'"IMPLEMENTATION" "x"\r\n"SASL" "PLAIN"\r\nOK "hi"\r\n') == [
        BackendReady()]
    return d


def test_backend_starttls_recapabilities_xclient_login():
    d = dialogue(tls_mode="starttls", forwarding=FORWARDING)
    assert d.receive(DOVECOT_CAPS) == []
    assert d.receive(b'OK "Dovecot (Debian) ready."\r\n') == [BackendSend(b"STARTTLS\r\n")]
    assert d.receive(b'OK "Begin TLS negotiation now."\r\nOK "injected"\r\n') == [
        BackendStartTLS()]
    assert d.receive(b'"XCLIENT"\r\n') == []
    assert d.tls_started() == []
    assert d.receive(DOVECOT_CAPS.replace(b'"STARTTLS"\r\n', b"")
                     + b'OK "TLS negotiation successful."\r\n') == [BackendSend(XCLIENT)]
    assert d.receive(b'OK "Updated"\r\n') == [BackendReady()]
    assert d.login(CREDS, None) == [BackendSend(AUTHENTICATE)]
    assert d.receive(b'OK (SASL "c3Y=") "Logged in."\r\n') == [
        LoginSucceeded(b'OK (SASL "c3Y=") "Logged in."\r\n')]


def test_backend_capabilities_after_tls_replace_the_old_ones():
    d = dialogue(tls_mode="starttls", forwarding=FORWARDING)
    d.receive(DOVECOT_CAPS + b"OK\r\n")
    d.receive(b"OK\r\n")
    d.tls_started()
    assert d.receive(b'"SASL" "PLAIN"\r\nOK\r\n') == [BackendReady()]  # no XCLIENT any more


def test_backend_xclient_only_when_advertised_and_forwarding():
    ready(forwarding=FORWARDING)
    d = dialogue()
    assert d.receive(DOVECOT_CAPS + b"OK\r\n") == [BackendReady()]
    d = dialogue(forwarding=FORWARDING)
    d.receive(DOVECOT_CAPS + b"OK\r\n")
    assert d.receive(b'NO "Not trusted"\r\n') == [BackendError("backend refused XCLIENT")]


def test_backend_without_starttls_is_an_error():
    d = dialogue(tls_mode="starttls")
    assert d.receive(b'"SASL" "PLAIN"\r\nOK\r\n') == [
        BackendError("backend does not offer STARTTLS")]
    d = dialogue(tls_mode="starttls")
    d.receive(b'"STARTTLS"\r\nOK\r\n')
    assert d.receive(b'NO "no"\r\n') == [BackendError("backend refused STARTTLS")]


@pytest.mark.parametrize("greeting, reason", [
    (b'BYE "Too many connections"\r\n', "backend refused the connection"),
    (b'NO "x"\r\n', "backend refused the connection"),
    (b"* OK IMAP ready\r\n", "unexpected backend greeting"),
    (b"+OK POP3\r\n", "unexpected backend greeting"),
])
def test_backend_bad_greetings(greeting, reason):
    assert dialogue().receive(greeting) == [BackendError(reason)]


def test_backend_capability_block_is_bounded():
    too_many = BackendError("backend sent too many capabilities")
    d = dialogue()
    assert d.receive(b'"X"\r\n' * MAX_CAPABILITY_LINES) == []
    assert d.receive(b'"X"\r\n') == [too_many]
    d = dialogue()  # the values count too, literals included
    assert d.receive(b'"SIEVE" {%d}\r\n%s\r\n' % (MAX_CAPABILITY_BYTES - 100,
                                                   b"x" * (MAX_CAPABILITY_BYTES - 100))) == []
    assert d.receive(b'"NOTIFY" "%s"\r\n' % (b"m" * 100)) == [too_many]
    d = dialogue(tls_mode="starttls")  # a block within bounds is read to its end
    assert d.receive(b'"X"\r\n' * (MAX_CAPABILITY_LINES - 1) + b'"STARTTLS"\r\nOK\r\n') == [
        BackendSend(b"STARTTLS\r\n")]
    assert dialogue().receive(b'"X" {%d}\r\n' % (MAX_PREAUTH_LINE + 1)) == [
        BackendError("backend line too long")]


def test_backend_literal_in_capabilities_and_responses():
    d = dialogue()
    assert d.receive(b'{4}\r\nSASL "PLAIN"\r\nOK\r\n') == [BackendReady()]
    d.login(CREDS, None)
    assert d.receive(b"NO {9}\r\nno\r\nreally\r\n") == [
        LoginFailed(b"NO {9}\r\nno\r\nreally\r\n")]


def test_login_failure_relayed_or_hidden():
    d = ready()
    d.login(CREDS, None)
    assert d.receive(b'NO "Authentication failed."\r\n') == [
        LoginFailed(b'NO "Authentication failed."\r\n')]
    d = ready(hide=True)
    d.login(CREDS, None)
    assert d.receive(b'NO (TRANSITION-NEEDED) "details"\r\n') == [LoginFailed(HIDDEN)]


def test_login_unexpected_challenge_and_bye():
    d = ready()
    d.login(CREDS, None)
    assert d.receive(b'"eyJzdGF0dXMiOiI0MDEifQ=="\r\n') == [BackendSend(b'"*"\r\n')]
    assert d.receive(b'OK "odd"\r\n') == [LoginFailed(HIDDEN)]
    d = ready()
    d.login(CREDS, None)
    assert d.receive(b'BYE "shutting down"\r\n') == [BackendError("backend closed the session")]
    d = ready()
    d.login(CREDS, None)
    assert d.receive(b"+OK\r\n") == [BackendError("unexpected response from backend")]


def test_login_empty_and_long_responses():
    d = ready()
    assert d.login(Credentials("PLAIN", b""), None) == [
        BackendSend(b'AUTHENTICATE "PLAIN" ""\r\n')]
    d = ready()
    long = Credentials("XOAUTH2", b"x" * 2000)
    encoded = b64(long.response)
    assert d.login(long, None) == [BackendSend(
        b'AUTHENTICATE "XOAUTH2" {%d+}\r\n' % len(encoded) + encoded + b"\r\n")]


def test_backend_unexpected_while_ready_and_leftover():
    d = ready()
    assert d.receive(b'OK "spontaneous"\r\n') == [
        BackendError("unexpected response from backend")]
    d = ready()
    d.login(CREDS, None)
    assert d.receive(b'OK "in"\r\nOK "next"\r\n') == [LoginSucceeded(b'OK "in"\r\n')]
    d.receive(b"x")
    assert d.leftover == b'OK "next"\r\nx'


def test_backend_misuse():
    with pytest.raises(RuntimeError):
        dialogue().login(CREDS, None)
    with pytest.raises(RuntimeError):
        dialogue().tls_started()


PHASES = (DOVECOT_CAPS + b'OK "ready"\r\nOK "go"\r\n',
          DOVECOT_CAPS + b'OK "TLS"\r\nOK "Updated"\r\n',
          b'OK (SASL "eA==") "Logged in."\r\nOK (TAG {1}\r\nx) "Done"\r\n')


@given(st.lists(st.integers(0, 400), max_size=8))
def test_backend_dialogue_split_independent(cuts):
    def run(chunks_per_phase):
        d = dialogue(tls_mode="starttls", forwarding=FORWARDING)
        events = []
        for chunk in chunks_per_phase[0]:
            events += d.receive(chunk)
        events += d.tls_started()
        for chunk in chunks_per_phase[1]:
            events += d.receive(chunk)
        events += d.login(CREDS, None)
        for chunk in chunks_per_phase[2]:
            events += d.receive(chunk)
        return events, d.leftover
    whole = run([[phase] for phase in PHASES])
    assert run([split(phase, cuts) for phase in PHASES]) == whole
    events, leftover = whole
    assert events[-1] == LoginSucceeded(b'OK (SASL "eA==") "Logged in."\r\n')
    assert leftover == b'OK (TAG {1}\r\nx) "Done"\r\n'


@given(st.binary(max_size=600), st.sampled_from(["implicit", "starttls"]))
def test_backend_random_bytes_never_raise(data, tls_mode):
    d = dialogue(tls_mode=tls_mode, forwarding=FORWARDING)
    events = d.receive(data)
    for event in events:
        assert isinstance(event, (BackendSend, BackendStartTLS, BackendReady, BackendError))
    if events and isinstance(events[-1], BackendReady):
        d.login(CREDS, None)
        for event in d.receive(data):
            assert isinstance(event, (BackendSend, LoginSucceeded, LoginFailed, BackendError))
