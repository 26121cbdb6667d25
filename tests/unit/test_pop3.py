"""stalroute.protocols.pop3: the pre-auth server machine and the backend dialogue (sans-IO).

Also covers the shared life cycle of :mod:`stalroute.protocols.linebased` and the plain
(non-SMTP) form of :mod:`stalroute.protocols.xclient`.
"""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from stalroute.config import ProtocolCapabilities
from stalroute.protocols import PROTOCOLS
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
from stalroute.protocols.lines import MAX_CAPABILITY_BYTES, MAX_CAPABILITY_LINES
from stalroute.protocols.pop3 import (
    SPEC,
    POP3BackendDialogue,
    POP3Capabilities,
    POP3Login,
    POP3PreAuth,
)
from stalroute.protocols.xclient import IMPLIED_ATTRIBUTES, xclient_command
from stalroute.sasl import MECHANISMS, Credentials, decode_xoauth2, plain_credentials
from tests.unit.preauth_checks import assert_well_formed, authenticates, split, text

PASSWORD = "s3cr3t"
CONTEXT = POP3Login(utf8=False)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def make_settings(tls_mode: str = "starttls", sasl: tuple[str, ...] = MECHANISMS,
                  allow: bool = False, max_auth_attempts: int = 3,
                  banner: str = "stalroute ready",
                  utf8: bool = True) -> PreAuthSettings[POP3Capabilities]:
    return PreAuthSettings(hostname="mx.example.com", tls_mode=tls_mode, sasl=sasl,
                           allow_plain_auth_without_tls=allow, banner=banner,
                           capabilities=POP3Capabilities(utf8=utf8),
                           max_auth_attempts=max_auth_attempts)


def machine(**kwargs) -> POP3PreAuth:
    m = POP3PreAuth(make_settings(**kwargs))
    m.greeting()
    return m


def tls_machine(**kwargs) -> POP3PreAuth:
    return machine(tls_mode="implicit", **kwargs)


def test_spec_names_the_machines():
    assert (SPEC.name, SPEC.preauth, SPEC.dialogue) == ("pop3", POP3PreAuth, POP3BackendDialogue)


# --- greeting and CAPA ----------------------------------------------------------------------


def test_greeting():
    assert POP3PreAuth(make_settings()).greeting() == [Reply(b"+OK stalroute ready\r\n")]
    assert POP3PreAuth(make_settings(banner="a\r\nb")).greeting() == [Reply(b"+OK a??b\r\n")]
    assert POP3PreAuth(make_settings(banner="")).greeting() == [Reply(b"+OK Ready.\r\n")]


def test_capa_before_tls_on_a_starttls_listener():
    m = machine()
    assert m.tls_active is False
    assert m.receive(b"CAPA\r\n") == [Reply(
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nSASL OAUTHBEARER XOAUTH2\r\nSTLS\r\nUTF8\r\n.\r\n")]


def test_capa_over_tls():
    m = tls_machine()
    assert m.tls_active is True
    assert m.receive(b"capa\r\n") == [Reply(
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nUSER\r\nSASL PLAIN LOGIN OAUTHBEARER XOAUTH2\r\nUTF8\r\n.\r\n")]


def test_capa_without_any_usable_mechanism_and_override():
    m = machine(tls_mode="plain", sasl=("PLAIN",))
    assert b"SASL" not in text(m.receive(b"CAPA\r\n"))
    assert b"STLS" not in text(m.receive(b"CAPA\r\n"))
    m = machine(tls_mode="plain", allow=True, sasl=("LOGIN",))
    assert b"USER\r\nSASL LOGIN\r\n" in text(m.receive(b"CAPA\r\n"))


def test_noop_utf8_and_argument_checks():
    m = machine()
    assert m.receive(b"NOOP\r\n") == [Reply(b"+OK\r\n")]
    assert m.receive(b"UTF8\n") == [Reply(b"+OK UTF8 enabled\r\n")]
    assert m.receive(b"NOOP x\r\n") == [Reply(b"-ERR Invalid arguments\r\n")]
    assert m.receive(b"CAPA x\r\n") == [Reply(b"-ERR Invalid arguments\r\n")]
    assert m.receive(b"UTF8 x\r\n") == [Reply(b"-ERR Invalid arguments\r\n")]


def test_utf8_is_neither_advertised_nor_accepted_when_a_destination_lacks_it():
    m = POP3PreAuth(make_settings(tls_mode="implicit", banner="ready", utf8=False))
    m.greeting()
    assert b"UTF8" not in text(m.receive(b"CAPA\r\n"))
    assert text(m.receive(b"UTF8\r\n")).startswith(b"-ERR Unknown command")


def test_quit_closes_and_ignores_the_rest():
    m = machine()
    assert m.receive(b"QUIT\r\nNOOP\r\n") == [Reply(b"+OK Logging out\r\n"), Close()]
    assert m.receive(b"NOOP\r\n") == []
    assert m.timed_out() == []


@pytest.mark.parametrize("line", [b"STAT\r\n", b"RETR 1\r\n", b"\r\n", b"XCLIENT ADDR=1.2.3.4\r\n",
                                  b"LIST\r\n", b" CAPA\r\n", b"\xff\r\n"])
def test_other_commands_are_refused(line):
    assert machine().receive(line) == [
        Reply(b"-ERR Unknown command or not allowed before authentication\r\n")]


def test_apop_is_unsupported_and_not_counted():
    m = tls_machine()
    for _ in range(MAX_BAD_COMMANDS + 1):
        assert m.receive(b"APOP alice 0123456789abcdef\r\n") == [
            Reply(b"-ERR APOP is not supported\r\n")]


def test_too_many_bad_commands_close_the_connection():
    m = machine()
    events = m.receive(b"FOO\r\n" * (MAX_BAD_COMMANDS + 5))
    assert events[-2:] == [Reply(b"-ERR Too many invalid commands\r\n"), Close()]
    assert len(events) == MAX_BAD_COMMANDS + 2


# --- STLS -----------------------------------------------------------------------------------


def test_stls_discards_injected_bytes_and_changes_capabilities():
    m = machine()
    events = m.receive(b"STLS\r\nUSER alice\r\nPASS injected\r\n")
    assert events == [Reply(b"+OK Begin TLS negotiation now\r\n"), StartTLS()]
    assert m.receive(b"more injected\r\n") == []
    assert m.tls_started() == []
    assert m.tls_active is True
    caps = text(m.receive(b"CAPA\r\n"))
    assert b"STLS" not in caps and b"USER" in caps and b"SASL PLAIN LOGIN" in caps
    assert m.receive(b"STLS\r\n") == [Reply(b"-ERR Command not permitted when TLS active\r\n")]


def test_stls_not_offered_on_other_modes():
    assert tls_machine().receive(b"STLS\r\n") == [
        Reply(b"-ERR Command not permitted when TLS active\r\n")]
    assert machine(tls_mode="plain").receive(b"STLS\r\n") == [
        Reply(b"-ERR STLS not available\r\n")]


def test_tls_started_misuse():
    with pytest.raises(RuntimeError):
        machine().tls_started()
    m = machine()
    m.receive(b"STLS\r\n")
    m.timed_out()
    assert m.tls_started() == []


# --- USER / PASS ----------------------------------------------------------------------------


def test_user_pass():
    m = tls_machine()
    assert m.receive(b"USER alice@example.com\r\n") == [Reply(b"+OK\r\n")]
    events = m.receive(b"PASS pass word with spaces\r\n")
    assert events == [Authenticate(plain_credentials("alice@example.com",
                                                     "pass word with spaces"), CONTEXT)]


def test_user_pass_refused_without_tls():
    m = machine()
    refusal = [Reply(b"-ERR [AUTH] Cleartext authentication is not allowed without TLS\r\n")]
    assert m.receive(b"USER alice\r\n") == refusal
    assert m.receive(b"PASS secret\r\n") == refusal
    assert authenticates(machine(tls_mode="plain", allow=True).receive(
        b"USER alice\r\nPASS secret\r\n"))


def test_pass_needs_user_and_user_is_forgotten_after_pass():
    m = tls_machine()
    assert m.receive(b"PASS x\r\n") == [Reply(b"-ERR No user name given\r\n")]
    m.receive(b"USER alice\r\nPASS x\r\n")
    m.auth_failed(b"-ERR [AUTH] nope\r\n")
    assert m.receive(b"PASS x\r\n") == [Reply(b"-ERR No user name given\r\n")]


@pytest.mark.parametrize("lines, reply", [
    (b"USER\r\n", b"-ERR Invalid arguments\r\n"),
    (b"USER \r\n", b"-ERR Invalid arguments\r\n"),
    (b"PASS\r\n", b"-ERR Invalid arguments\r\n"),
])
def test_user_pass_syntax(lines, reply):
    assert tls_machine().receive(lines) == [Reply(reply)]


def test_unusable_user_pass_is_a_counted_failure():
    m = tls_machine(max_auth_attempts=2)
    assert m.receive(b"USER alice\r\nPASS \r\n") == [
        Reply(b"+OK\r\n"), Reply(b"-ERR [AUTH] Empty user name or password\r\n")]
    assert m.receive(b"USER \xff\r\nPASS x\r\n") == [
        Reply(b"+OK\r\n"), Reply(b"-ERR [AUTH] Credentials are not valid UTF-8\r\n"), Close()]


def test_utf8_is_carried_in_the_context():
    m = tls_machine()
    events = m.receive(b"UTF8\r\nUSER j\xc3\xb6rg\r\nPASS pw\r\n")
    assert authenticates(events) == [Authenticate(plain_credentials("jörg", "pw"),
                                                  POP3Login(utf8=True))]


# --- AUTH -----------------------------------------------------------------------------------


def test_bare_auth_lists_the_usable_mechanisms():
    assert machine().receive(b"AUTH\r\n") == [Reply(b"+OK\r\nOAUTHBEARER\r\nXOAUTH2\r\n.\r\n")]
    assert tls_machine(sasl=("PLAIN", "XOAUTH2")).receive(b"auth\r\n") == [
        Reply(b"+OK\r\nPLAIN\r\nXOAUTH2\r\n.\r\n")]


def test_auth_plain_with_initial_response():
    m = tls_machine()
    events = m.receive(b"AUTH PLAIN " + b64(b"\0alice\0" + PASSWORD.encode()) + b"\r\n")
    assert events == [Authenticate(plain_credentials("alice", PASSWORD), CONTEXT)]


def test_auth_plain_with_continuation_and_empty_initial_response():
    m = tls_machine()
    assert m.receive(b"AUTH plain\r\n") == [Reply(b"+ \r\n")]
    assert authenticates(m.receive(b64(b"\0alice\0pw") + b"\r\n"))[0].credentials.login == "alice"
    m = tls_machine()
    assert m.receive(b"AUTH PLAIN =\r\n") == [
        Reply(b"-ERR [AUTH] PLAIN response must have three NUL-separated fields\r\n")]


def test_auth_login_prompts():
    m = tls_machine()
    assert m.receive(b"AUTH LOGIN\r\n") == [Reply(b"+ VXNlcm5hbWU6\r\n")]
    assert m.receive(b64(b"alice") + b"\r\n") == [Reply(b"+ UGFzc3dvcmQ6\r\n")]
    assert m.receive(b64(PASSWORD.encode()) + b"\r\n") == [
        Authenticate(plain_credentials("alice", PASSWORD), CONTEXT)]


def test_auth_xoauth2_without_tls():
    response = b"user=alice@example.com\x01auth=Bearer tok\x01\x01"
    events = machine().receive(b"AUTH XOAUTH2 " + b64(response) + b"\r\n")
    assert events == [Authenticate(decode_xoauth2(response), CONTEXT)]


def test_auth_abort_is_not_counted():
    m = tls_machine(max_auth_attempts=1)
    m.receive(b"AUTH PLAIN\r\n")
    assert m.receive(b"*\r\n") == [Reply(b"-ERR Authentication aborted\r\n")]
    assert m.receive(b"NOOP\r\n") == [Reply(b"+OK\r\n")]


@pytest.mark.parametrize("command, reply", [
    (b"AUTH PLAIN\r\n", b"-ERR [AUTH] Cleartext authentication is not allowed without TLS\r\n"),
    (b"AUTH LOGIN\r\n", b"-ERR [AUTH] Cleartext authentication is not allowed without TLS\r\n"),
    (b"AUTH CRAM-MD5\r\n", b"-ERR Unsupported authentication mechanism\r\n"),
    (b"AUTH XOAUTH2\r\n", b"-ERR Unsupported authentication mechanism\r\n"),
    (b"AUTH PLAIN x y\r\n", b"-ERR Invalid arguments\r\n"),
    (b"AUTH \r\n", b"-ERR Invalid arguments\r\n"),
    (b"AUTH PLAIN  x\r\n", b"-ERR Invalid arguments\r\n"),
])
def test_auth_refusals(command, reply):
    assert machine(sasl=("PLAIN", "LOGIN", "OAUTHBEARER")).receive(command) == [Reply(reply)]


def test_malformed_sasl_response_is_a_counted_failure():
    m = tls_machine(max_auth_attempts=1)
    m.receive(b"AUTH PLAIN\r\n")
    assert m.receive(b"!!\r\nNOOP\r\n") == [Reply(b"-ERR [AUTH] Invalid base64 data\r\n"), Close()]


# --- outcomes, limits, timeout --------------------------------------------------------------


def test_pipelined_bytes_are_held_then_handed_over():
    m = tls_machine()
    events = m.receive(b"USER alice\r\nPASS pw\r\nSTAT\r\n")
    assert len(authenticates(events)) == 1 and text(events) == b"+OK\r\n"
    assert m.receive(b"RETR 1\r\n") == []
    assert m.auth_succeeded() == b"STAT\r\nRETR 1\r\n"
    with pytest.raises(RuntimeError):
        m.receive(b"x")


def test_auth_failed_counts_and_resumes_pipelined_commands():
    m = tls_machine(max_auth_attempts=2)
    m.receive(b"USER a\r\nPASS b\r\nNOOP\r\n")
    assert m.auth_failed(b"-ERR [AUTH] nope\r\n") == [
        Reply(b"-ERR [AUTH] nope\r\n"), Reply(b"+OK\r\n")]
    m.receive(b"USER a\r\nPASS b\r\nNOOP\r\n")
    assert m.auth_failed(b"-ERR [AUTH] nope\r\n") == [Reply(b"-ERR [AUTH] nope\r\n"), Close()]
    assert m.receive(b"NOOP\r\n") == []


def test_auth_unavailable_is_a_temporary_failure_not_counted():
    m = tls_machine(max_auth_attempts=1)
    for _ in range(3):
        m.receive(b"USER a\r\nPASS b\r\n")
        assert m.auth_unavailable("backend down\r\n-ERR x") == [
            Reply(b"-ERR [SYS/TEMP] backend down??-ERR x\r\n")]
    m.receive(b"USER a\r\nPASS b\r\n")
    assert m.auth_unavailable("") == [
        Reply(b"-ERR [SYS/TEMP] Service temporarily unavailable\r\n")]


def test_outcomes_without_a_login_are_errors():
    m = tls_machine()
    for call in (lambda: m.auth_failed(b"x"), m.auth_succeeded, lambda: m.auth_unavailable("")):
        with pytest.raises(RuntimeError):
            call()


def test_outcome_after_close_is_ignored():
    m = tls_machine()
    m.receive(b"USER a\r\nPASS b\r\n")
    assert m.timed_out() == [Reply(b"-ERR Disconnected for inactivity\r\n"), Close()]
    assert m.auth_failed(b"-ERR no\r\n") == []
    assert m.auth_unavailable("x") == []


def test_too_much_pipelined_input_closes():
    m = tls_machine()
    m.receive(b"USER a\r\nPASS b\r\n")
    assert m.receive(b"x" * MAX_PREAUTH_LINE) == []
    assert m.receive(b"x") == [
        Reply(b"-ERR Too much input before authentication completed\r\n"), Close()]


def test_line_too_long():
    m = machine()
    assert m.receive(b"NOOP " + b"x" * MAX_PREAUTH_LINE) == [
        Reply(b"-ERR Line too long\r\n"), Close()]
    assert m.receive(b"\r\n") == []


def test_long_sasl_response_within_the_limit():
    m = tls_machine()
    token = "t" * 40000
    response = b64(f"user=a@b\x01auth=Bearer {token}\x01\x01".encode())
    assert m.receive(b"AUTH XOAUTH2\r\n") == [Reply(b"+ \r\n")]
    assert authenticates(m.receive(response + b"\r\n"))[0].credentials.token == token


# --- properties -----------------------------------------------------------------------------


fields = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0\r\n"),
                 min_size=1, max_size=12).filter(lambda value: value.strip(" ") == value)


@given(fields, fields, st.booleans(), st.lists(st.integers(0, 10_000), max_size=8))
def test_login_split_anywhere_gives_the_same_events(user, password, use_auth, cuts):
    if use_auth:
        ir = b64(b"\0" + user.encode() + b"\0" + password.encode())
        script = b"CAPA\r\nAUTH PLAIN\r\n" + ir + b"\r\nSTAT\r\n"
    else:
        script = (b"CAPA\r\nUSER " + user.encode() + b"\r\nPASS " + password.encode()
                  + b"\r\nSTAT\r\n")
    whole_machine = tls_machine()
    whole = whole_machine.receive(script)
    chunked_machine = tls_machine()
    chunked = []
    for chunk in split(script, cuts):
        chunked += chunked_machine.receive(chunk)
    assert chunked == whole
    assert authenticates(whole) == [Authenticate(plain_credentials(user, password), CONTEXT)]
    assert chunked_machine.auth_succeeded() == whole_machine.auth_succeeded() == b"STAT\r\n"


command_words = st.sampled_from([
    b"USER", b"PASS", b"AUTH", b"PLAIN", b"LOGIN", b"XOAUTH2", b"CAPA", b"STLS", b"QUIT",
    b"NOOP", b"UTF8", b"APOP", b" ", b"\r\n", b"\n", b"*", b"=", b"AGFAYg==", b"alice",
    b"\x00", b"\xff", b"+", b"-ERR",
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
    assert_well_formed(whole)


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


# --- XCLIENT (plain form) -------------------------------------------------------------------

FORWARDING = ForwardingInfo(client_ip="192.0.2.10", client_port=51000, local_ip="198.51.100.1",
                            local_port=995, session_id="1-abcdef", ttl=6, client_tls=True)
XCLIENT = b"XCLIENT ADDR=192.0.2.10 PORT=51000 SESSION=1-abcdef TTL=6\r\n"


def test_xclient_plain_form():
    assert IMPLIED_ATTRIBUTES == ("ADDR", "PORT", "SESSION", "TTL")
    assert xclient_command(FORWARDING, None, smtp=False) + b"\r\n" == XCLIENT
    assert xclient_command(FORWARDING, ["addr", "HELO", "LOGIN", "PROTO"], smtp=False) == (
        b"XCLIENT ADDR=192.0.2.10")
    assert xclient_command(FORWARDING, ["LOGIN", "NAME"], smtp=False) is None
    v6 = ForwardingInfo("2001:db8::1", 1, "::ffff:10.0.0.1", 2, "bad id=x", 0)
    assert xclient_command(v6, ["ADDR", "DESTADDR", "SESSION", "TTL"], smtp=False) == (
        b"XCLIENT ADDR=2001:db8::1 DESTADDR=10.0.0.1 TTL=0")


# --- backend dialogue -----------------------------------------------------------------------

CREDS = plain_credentials("alice", PASSWORD)
AUTH = b"AUTH PLAIN " + b64(CREDS.response) + b"\r\n"
DOVECOT_CAPA = (b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
                b"STLS\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n")
HIDDEN = b"-ERR [AUTH] Authentication failed.\r\n"


def dialogue(tls_mode: str = "implicit", forwarding: ForwardingInfo | None = None,
             hide: bool = False) -> POP3BackendDialogue:
    return POP3BackendDialogue(BackendSettings(tls_mode=tls_mode, forwarding=forwarding,
                                               hide_auth_errors=hide))


def ready(**kwargs) -> POP3BackendDialogue:
    d = dialogue(**kwargs)
    assert d.receive(b"+OK Dovecot ready.\r\n") == [BackendReady()]
    return d


def test_backend_implicit_tls_without_forwarding_is_ready_at_once():
    ready()


def test_backend_starttls_capa_and_xclient_sequence():
    d = dialogue(tls_mode="starttls", forwarding=FORWARDING)
    assert d.receive(b"+OK [XCLIENT] Dovecot (Debian) ready.\r\n") == [BackendSend(b"CAPA\r\n")]
    assert d.receive(DOVECOT_CAPA) == [BackendSend(b"STLS\r\n")]
    assert d.receive(b"+OK Begin TLS negotiation now.\r\n+OK injected\r\n") == [BackendStartTLS()]
    assert d.receive(b"+OK more cleartext\r\n") == []
    assert d.tls_started() == [BackendSend(b"CAPA\r\n")]
    assert d.receive(b"+OK\r\nUSER\r\n.\r\n") == [BackendSend(XCLIENT)]
    assert d.receive(b"+OK Updated\r\n") == [BackendReady()]
    assert d.login(CREDS, CONTEXT) == [BackendSend(AUTH)]
    assert d.receive(b"+OK Logged in.\r\n") == [LoginSucceeded(b"+OK Logged in.\r\n")]


def test_backend_xclient_from_the_greeting_hint_needs_no_capa():
    d = dialogue(forwarding=FORWARDING)
    assert d.receive(b"+OK [XCLIENT] ready\r\n") == [BackendSend(XCLIENT)]
    assert d.receive(b"+OK\r\n") == [BackendReady()]


def test_backend_xclient_from_capa_or_not_at_all():
    d = dialogue(forwarding=FORWARDING)
    assert d.receive(b"+OK ready\r\n") == [BackendSend(b"CAPA\r\n")]
    assert d.receive(b"+OK\r\nxclient\r\n..odd\r\n.\r\n") == [BackendSend(XCLIENT)]
    d = dialogue(forwarding=FORWARDING)
    d.receive(b"+OK ready\r\n")
    assert d.receive(b"+OK\r\nUSER\r\n.\r\n") == [BackendReady()]
    d = dialogue(forwarding=FORWARDING)
    d.receive(b"+OK ready\r\n")
    assert d.receive(b"-ERR no CAPA here\r\n") == [BackendReady()]


def test_backend_xclient_refused():
    d = dialogue(forwarding=FORWARDING)
    d.receive(b"+OK [XCLIENT] ready\r\n")
    assert d.receive(b"-ERR Not trusted\r\n") == [BackendError("backend refused XCLIENT")]


def test_backend_without_stls_is_an_error_never_a_fallback():
    d = dialogue(tls_mode="starttls")
    d.receive(b"+OK ready\r\n")
    assert d.receive(b"+OK\r\nUSER\r\n.\r\n") == [BackendError("backend does not offer STLS")]
    d = dialogue(tls_mode="starttls")
    d.receive(b"+OK ready\r\n")
    assert d.receive(b"-ERR\r\n") == [BackendError("backend does not offer STLS")]
    d = dialogue(tls_mode="starttls")
    d.receive(b"+OK ready\r\n")
    d.receive(b"+OK\r\nSTLS\r\n.\r\n")
    assert d.receive(b"-ERR no\r\n") == [BackendError("backend refused STLS")]


@pytest.mark.parametrize("greeting, reason", [
    (b"-ERR go away\r\n", "backend refused the connection"),
    (b"* OK IMAP\r\n", "unexpected backend greeting"),
    (b"220 smtp\r\n", "unexpected backend greeting"),
    (b"+OKAY\r\n", "unexpected backend greeting"),
])
def test_backend_bad_greetings(greeting, reason):
    assert dialogue().receive(greeting) == [BackendError(reason)]


def test_backend_unexpected_lines():
    d = ready()
    assert d.receive(b"+OK spontaneous\r\n") == [BackendError("unexpected response from backend")]
    d = dialogue(tls_mode="starttls")
    d.receive(b"+OK ready\r\n")
    assert d.receive(b"* CAPA\r\n") == [BackendError("unexpected response from backend")]
    d = ready()
    d.login(CREDS, CONTEXT)
    assert d.receive(b"OK\r\n") == [BackendError("unexpected response from backend")]


def test_backend_capa_is_bounded():
    assert (MAX_CAPABILITY_LINES, MAX_CAPABILITY_BYTES) == (64, 16 * 1024)
    too_many = BackendError("backend sent too many capabilities")
    d = dialogue(tls_mode="starttls")
    d.receive(b"+OK ready\r\n+OK\r\n")
    assert d.receive(b"X\r\n" * MAX_CAPABILITY_LINES) == []
    assert d.receive(b"X\r\n") == [too_many]
    d = dialogue(tls_mode="starttls")
    d.receive(b"+OK ready\r\n+OK\r\n")
    assert d.receive(b"X-LONG " + b"x" * (MAX_CAPABILITY_BYTES - 100) + b"\r\n") == []
    assert d.receive(b"X-MORE " + b"x" * 100 + b"\r\n") == [too_many]
    d = dialogue(tls_mode="starttls")  # a list within bounds is read to its end
    d.receive(b"+OK ready\r\n+OK\r\n")
    assert d.receive(b"X\r\n" * (MAX_CAPABILITY_LINES - 1) + b"STLS\r\n.\r\n") == [
        BackendSend(b"STLS\r\n")]
    d = dialogue()
    assert d.receive(b"+OK " + b"x" * MAX_PREAUTH_LINE + b"\r\n") == [
        BackendError("backend line too long")]


def test_login_failure_relayed_or_hidden():
    d = ready()
    d.login(CREDS, CONTEXT)
    assert d.receive(b"-ERR [AUTH] Wrong password\r\n") == [
        LoginFailed(b"-ERR [AUTH] Wrong password\r\n")]
    d = ready(hide=True)
    d.login(CREDS, CONTEXT)
    assert d.receive(b"-ERR [SYS/PERM] details\r\n") == [LoginFailed(HIDDEN)]


def test_long_response_goes_after_the_continuation():
    d = ready()
    token = "t" * 300
    oauth = Credentials("XOAUTH2", f"auth=Bearer {token}\x01\x01".encode(), token=token)
    assert d.login(oauth, CONTEXT) == [BackendSend(b"AUTH XOAUTH2\r\n")]
    assert d.receive(b"+ \r\n") == [BackendSend(b64(oauth.response) + b"\r\n")]
    assert d.receive(b"+OK in\r\n") == [LoginSucceeded(b"+OK in\r\n")]


def test_unexpected_challenge_is_cancelled_and_fails():
    d = ready()
    d.login(Credentials("OAUTHBEARER", b"n,,\x01auth=Bearer t\x01\x01", token="t"), CONTEXT)
    assert d.receive(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n") == [BackendSend(b"*\r\n")]
    assert d.receive(b"-ERR aborted\r\n") == [LoginFailed(HIDDEN)]


def test_utf8_is_replayed_before_the_login():
    d = ready()
    assert d.login(CREDS, POP3Login(utf8=True)) == [BackendSend(b"UTF8\r\n")]
    assert d.receive(b"-ERR Unknown command.\r\n") == [BackendSend(AUTH)]
    assert d.receive(b"+OK\r\n") == [LoginSucceeded(b"+OK\r\n")]
    # Capabilities known without UTF8: not sent at all.
    d = dialogue(tls_mode="starttls")
    d.receive(b"+OK ready\r\n")
    d.receive(b"+OK\r\nSTLS\r\n.\r\n")
    d.receive(b"+OK go\r\n")
    d.tls_started()
    assert d.receive(b"+OK\r\nSASL PLAIN\r\n.\r\n") == [BackendReady()]
    assert d.login(CREDS, POP3Login(utf8=True)) == [BackendSend(AUTH)]


def test_leftover_after_the_outcome():
    d = ready()
    d.login(CREDS, CONTEXT)
    assert d.receive(b"+OK in\r\n+OK 2 messages\r\n") == [LoginSucceeded(b"+OK in\r\n")]
    d.receive(b"more")
    assert d.leftover == b"+OK 2 messages\r\nmore"


def test_backend_misuse():
    with pytest.raises(RuntimeError):
        dialogue().login(CREDS, CONTEXT)
    with pytest.raises(RuntimeError):
        dialogue().tls_started()


BACKEND_PHASES = (
    b"+OK [XCLIENT] Dovecot ready.\r\n" + DOVECOT_CAPA,
    b"+OK Begin TLS\r\n",
    b"+OK\r\nUSER\r\nUTF8\r\n.\r\n+OK Updated\r\n",
    b"+OK\r\n+ \r\n+OK Logged in.\r\n+OK 1 message\r\n",
)


@given(st.lists(st.integers(0, 300), max_size=8))
def test_backend_dialogue_split_independent(cuts):
    def run(chunks_per_phase):
        d = dialogue(tls_mode="starttls", forwarding=FORWARDING)
        events = []
        for chunk in chunks_per_phase[0] + chunks_per_phase[1]:
            events += d.receive(chunk)
        events += d.tls_started()
        for chunk in chunks_per_phase[2]:
            events += d.receive(chunk)
        events += d.login(Credentials("XOAUTH2", b"x" * 300), POP3Login(utf8=True))
        for chunk in chunks_per_phase[3]:
            events += d.receive(chunk)
        return events, d.leftover
    whole = run([[phase] for phase in BACKEND_PHASES])
    assert run([split(phase, cuts) for phase in BACKEND_PHASES]) == whole
    events, leftover = whole
    assert events[-1] == LoginSucceeded(b"+OK Logged in.\r\n")
    assert leftover == b"+OK 1 message\r\n"


@given(st.binary(max_size=600), st.sampled_from(["implicit", "starttls"]))
def test_backend_random_bytes_never_raise(data, tls_mode):
    d = dialogue(tls_mode=tls_mode, forwarding=FORWARDING)
    events = d.receive(data)
    for event in events:
        assert isinstance(event, (BackendSend, BackendStartTLS, BackendReady, BackendError))
    if events and isinstance(events[-1], BackendReady):
        d.login(CREDS, CONTEXT)
        for event in d.receive(data):
            assert isinstance(event, (BackendSend, LoginSucceeded, LoginFailed, BackendError))


# --- the shared life cycle (linebased.LinePreAuth), for all four protocols ------------------

LIFECYCLE_SCRIPTS = {
    "imap": [b"a CAPABILITY\r\n", b"b STARTTLS\r\n", b"c LOGIN alice pw\r\n",
             b"d AUTHENTICATE PLAIN\r\n", b64(b"\0a\0b") + b"\r\n", b"*\r\n",
             b"e NOOP\r\n", b"f LOGOUT\r\n", b"g LOGIN {3}\r\n"],
    "pop3": [b"CAPA\r\n", b"STLS\r\n", b"USER alice\r\nPASS pw\r\n", b"AUTH PLAIN\r\n",
             b64(b"\0a\0b") + b"\r\n", b"*\r\n", b"NOOP\r\n", b"QUIT\r\n", b"\xff\r\n"],
    "managesieve": [b"CAPABILITY\r\n", b"STARTTLS\r\n",
                    b'AUTHENTICATE "PLAIN" "' + b64(b"\0a\0b") + b'"\r\n',
                    b'AUTHENTICATE "PLAIN"\r\n', b'"' + b64(b"\0a\0b") + b'"\r\n',
                    b'"*"\r\n', b"NOOP\r\n", b"LOGOUT\r\n", b"{3+}\r\nabc\r\n"],
    "submission": [b"EHLO c\r\n", b"STARTTLS\r\n", b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n",
                   b"AUTH LOGIN\r\n", b64(b"a") + b"\r\n", b"*\r\n", b"MAIL FROM:<>\r\n",
                   b"QUIT\r\n", b"BDAT 3\r\nabc"],
}


@hypothesis_settings(max_examples=200)
@given(st.sampled_from(sorted(LIFECYCLE_SCRIPTS)), st.sampled_from(["starttls", "implicit"]),
       st.lists(st.tuples(st.integers(0, 8), st.sampled_from(["failed", "unavailable"])),
                max_size=25),
       st.booleans())
def test_lifecycle_random_interleavings(protocol, tls_mode, steps, time_out):
    spec = PROTOCOLS[protocol]
    assert spec.capabilities is not None
    own = spec.capabilities.settings(ProtocolCapabilities(), {})
    m = spec.preauth(replace(make_settings(tls_mode=tls_mode, max_auth_attempts=3),
                             capabilities=own))
    m.greeting()
    pending = closed = False
    starttls = False
    for index, outcome in steps:
        if pending:
            events = (m.auth_failed(b"-ERR no\r\n") if outcome == "failed"
                      else m.auth_unavailable("down"))
            pending = False
        elif starttls:
            events = m.tls_started()
            starttls = False
        else:
            events = m.receive(LIFECYCLE_SCRIPTS[protocol][index])
        if closed:
            assert events == []
        for event in events:
            assert not closed, "nothing may follow Close"
            assert isinstance(event, (Reply, Authenticate, StartTLS, Close))
            if isinstance(event, Authenticate):
                assert not pending
                pending = True
            closed = closed or isinstance(event, Close)
            starttls = starttls or isinstance(event, StartTLS)
    if pending and not closed:
        assert isinstance(m.auth_succeeded(), bytes)
    elif time_out and not closed:
        assert m.timed_out()[-1] == Close()


#: Starting an exchange without an initial response, then the client's ``*``, per protocol.
ABORTED_EXCHANGES = {
    "imap": (b"a AUTHENTICATE PLAIN\r\n", b"*\r\n", b"a BAD Authentication aborted\r\n"),
    "pop3": (b"AUTH PLAIN\r\n", b"*\r\n", b"-ERR Authentication aborted\r\n"),
    "managesieve": (b'AUTHENTICATE "PLAIN"\r\n', b'"*"\r\n',
                    b'NO "Authentication aborted."\r\n'),
    "submission": (b"EHLO c\r\nAUTH PLAIN\r\n", b"*\r\n", b"501 5.7.0 Authentication aborted\r\n"),
}


@pytest.mark.parametrize("protocol", sorted(ABORTED_EXCHANGES))
def test_an_aborted_exchange_counts_neither_as_a_failure_nor_as_an_error(protocol):
    spec = PROTOCOLS[protocol]
    assert spec.capabilities is not None
    own = spec.capabilities.settings(ProtocolCapabilities(), {})
    m = spec.preauth(replace(make_settings(tls_mode="implicit", max_auth_attempts=1),
                             capabilities=own))
    m.greeting()
    start, abort, answer = ABORTED_EXCHANGES[protocol]
    for _ in range(MAX_BAD_COMMANDS + 1):
        m.receive(start)
        assert m.receive(abort) == [Reply(answer)]
