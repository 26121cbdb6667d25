"""stalroute.protocols.submission: the pre-auth machine and the backend dialogue (sans-IO).

Also covers :mod:`stalroute.protocols.smtpreply` and the SMTP form of
:mod:`stalroute.protocols.xclient`.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from stalroute.config import DEFAULT_SUBMISSION_EHLO
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
from stalroute.protocols.lines import LineTooLong
from stalroute.protocols.smtpreply import (
    MalformedReply,
    ReplyReader,
    SMTPReply,
    ehlo_keywords,
    format_reply,
)
from stalroute.protocols.submission import (
    AUTH_SUCCEEDED,
    HIDDEN_FAILURE,
    SPEC,
    SubmissionBackendDialogue,
    SubmissionCapabilities,
    SubmissionPreAuth,
)
from stalroute.protocols.xclient import ATTRIBUTES, IMPLIED_ATTRIBUTES, xclient_command, xtext
from stalroute.sasl import MECHANISMS, Credentials, decode_xoauth2, plain_credentials
from tests.unit.preauth_checks import assert_well_formed, authenticates, split, text

PASSWORD = "s3cr3t"
EHLO_DEFAULT = b"".join(b"250-" + word.encode() + b"\r\n" for word in DEFAULT_SUBMISSION_EHLO)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def make_settings(tls_mode: str = "starttls", sasl: tuple[str, ...] = MECHANISMS,
                  allow: bool = False, max_auth_attempts: int = 3, banner: str = "ready",
                  ehlo: tuple[str, ...] | None = None) -> PreAuthSettings[SubmissionCapabilities]:
    own = SubmissionCapabilities() if ehlo is None else SubmissionCapabilities(ehlo=ehlo)
    return PreAuthSettings(hostname="mx.example.com", tls_mode=tls_mode, sasl=sasl,
                           allow_plain_auth_without_tls=allow, banner=banner,
                           capabilities=own, max_auth_attempts=max_auth_attempts)


def machine(greet: bool = True, **kwargs) -> SubmissionPreAuth:
    m = SubmissionPreAuth(make_settings(**kwargs))
    m.greeting()
    if greet:
        m.receive(b"EHLO client.example\r\n")
    return m


def tls_machine(**kwargs) -> SubmissionPreAuth:
    return machine(tls_mode="implicit", **kwargs)


def test_spec_names_the_machines():
    assert (SPEC.name, SPEC.preauth, SPEC.dialogue) == (
        "submission", SubmissionPreAuth, SubmissionBackendDialogue)


# --- SMTP replies ---------------------------------------------------------------------------


def test_reply_reader_multi_line_and_partial():
    reader = ReplyReader()
    reader.feed(b"250-mx.example\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME")
    assert reader.next_reply() is None
    reader.feed(b"\r\n220\r\n334 \r\n")
    reply = reader.next_reply()
    assert reply == SMTPReply(250, (b"mx.example", b"PIPELINING", b"AUTH PLAIN LOGIN",
                                    b"8BITMIME"),
                              b"250-mx.example\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n"
                              b"250 8BITMIME\r\n")
    assert reply.text == b"mx.example"
    assert ehlo_keywords(reply) == {"PIPELINING": (), "AUTH": (b"PLAIN", b"LOGIN"),
                                    "8BITMIME": ()}
    assert reader.next_reply() == SMTPReply(220, (b"",), b"220\r\n")
    assert reader.next_reply() == SMTPReply(334, (b"",), b"334 \r\n")
    reader.feed(b"250-a\r\nrest")
    assert reader.next_reply() is None
    assert reader.take_all() == b"250-a\r\nrest"


@pytest.mark.parametrize("data", [b"hello\r\n", b"250-a\r\n251 b\r\n", b"2500 x\r\n",
                                  b"199 x\r\n", b"25\r\n", b"250x\r\n"])
def test_reply_reader_rejects_malformed_replies(data):
    reader = ReplyReader()
    reader.feed(data)
    with pytest.raises(MalformedReply):
        reader.next_reply()


def test_reply_reader_is_bounded():
    reader = ReplyReader(limit=100)
    reader.feed(b"250-" + b"x" * 60 + b"\r\n" + b"250-" + b"x" * 60 + b"\r\n")
    with pytest.raises(LineTooLong):
        reader.next_reply()


def test_format_reply():
    assert format_reply(250, [b"a"]) == b"250 a\r\n"
    assert format_reply(250, [b"a", b"B", b"C"]) == b"250-a\r\n250-B\r\n250 C\r\n"


_reply_texts = st.binary(max_size=40).filter(lambda text: b"\r" not in text and b"\n" not in text)
_replies = st.lists(
    st.tuples(st.integers(200, 599), st.lists(_reply_texts, min_size=1, max_size=4)),
    min_size=1, max_size=5)


@hypothesis_settings(max_examples=300)
@given(_replies, st.lists(st.integers(0, 600), max_size=6))
def test_reply_reader_split_anywhere_gives_the_same_replies(replies, cuts):
    data = b"".join(format_reply(code, texts) for code, texts in replies)
    reader, got, position = ReplyReader(), [], 0
    for cut in [*sorted(cuts), len(data)]:
        reader.feed(data[position:max(position, cut)])
        position = max(position, cut)
        while (reply := reader.next_reply()) is not None:
            got.append(reply)
    assert got == [SMTPReply(code, tuple(texts), format_reply(code, texts))
                   for code, texts in replies]


@hypothesis_settings(max_examples=300)
@given(st.binary(max_size=400))
def test_reply_reader_random_bytes_raise_only_protocol_errors(data):
    reader = ReplyReader(limit=120)
    reader.feed(data)
    try:
        while reader.next_reply() is not None:
            pass
    except (MalformedReply, LineTooLong):
        pass


# --- XCLIENT (SMTP form) --------------------------------------------------------------------

FORWARDING = ForwardingInfo(client_ip="192.0.2.10", client_port=51000, local_ip="198.51.100.1",
                            local_port=587, session_id="1-abcdef", ttl=6, client_tls=True)
POSTFIX_XCLIENT = "NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT".split()
DOVECOT_XCLIENT = "ADDR PORT PROTO HELO LOGIN SESSION TTL TIMEOUT FORWARD".split()


def test_xtext():
    assert xtext("client.example") == "client.example"
    assert xtext("a+b=c d\x01é") == "a+2Bb+3Dc+20d+01+C3+A9"


def test_xclient_smtp_form_restricted_to_the_advertised_attributes():
    assert xclient_command(FORWARDING, POSTFIX_XCLIENT, smtp=True, helo="c.example",
                           proto="ESMTP") == (
        b"XCLIENT ADDR=192.0.2.10 PORT=51000 DESTADDR=198.51.100.1 DESTPORT=587 "
        b"HELO=c.example PROTO=ESMTP")
    assert xclient_command(FORWARDING, DOVECOT_XCLIENT, smtp=True, helo="x y",
                           proto="ESMTP") == (
        b"XCLIENT ADDR=192.0.2.10 PORT=51000 SESSION=1-abcdef TTL=6 HELO=x+20y PROTO=ESMTP")
    assert xclient_command(FORWARDING, ["client-transport", "LOGIN", "NAME"], smtp=True) == (
        b"XCLIENT CLIENT-TRANSPORT=TLS")
    assert xclient_command(FORWARDING, ["HELO"], smtp=True) is None  # no HELO given
    assert xclient_command(FORWARDING, [], smtp=True) is None
    v6 = ForwardingInfo("2001:db8::1", 1, "::ffff:10.0.0.1", 2, "s=1", 0)
    assert xclient_command(v6, ["ADDR", "DESTADDR", "SESSION"], smtp=True) == (
        b"XCLIENT ADDR=IPV6:2001:db8::1 DESTADDR=10.0.0.1 SESSION=s+3D1")


def test_xclient_never_sends_an_empty_value():
    """``NAME=`` with nothing after it is not a valid XCLIENT attribute (regression)."""
    unnamed = ForwardingInfo("192.0.2.10", 51000, "198.51.100.1", 587, "", 6)
    assert xclient_command(unnamed, DOVECOT_XCLIENT, smtp=True, helo="", proto="ESMTP") == (
        b"XCLIENT ADDR=192.0.2.10 PORT=51000 TTL=6 PROTO=ESMTP")
    assert xclient_command(unnamed, None, smtp=False) == (
        b"XCLIENT ADDR=192.0.2.10 PORT=51000 TTL=6")


_ip = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
_advertised = st.one_of(st.none(), st.lists(
    st.sampled_from([*ATTRIBUTES, "NAME", "LOGIN", "REVERSE_NAME", "x"]), max_size=10))


@hypothesis_settings(max_examples=300)
@given(_ip, st.integers(0, 65535), _ip, st.integers(0, 65535), st.text(max_size=30),
       st.integers(0, 255), st.booleans(), _advertised, st.booleans(),
       st.one_of(st.none(), st.text(max_size=30)))
def test_xclient_command_is_always_one_well_formed_line(client_ip, client_port, local_ip,
                                                        local_port, session, ttl, tls,
                                                        advertised, smtp, helo):
    info = ForwardingInfo(client_ip, client_port, local_ip, local_port, session, ttl, tls)
    command = xclient_command(info, advertised, smtp=smtp, helo=helo, proto="ESMTP")
    if command is None:
        return
    words = command.split(b" ")
    assert words[0] == b"XCLIENT" and len(words) > 1
    allowed = set(IMPLIED_ATTRIBUTES if advertised is None else advertised)
    for word in words[1:]:
        name, equals, value = word.partition(b"=")
        assert equals and value, command
        assert name.decode() in allowed - {"LOGIN", "NAME"}
        assert all(0x21 <= byte <= 0x7E for byte in value), command
        if smtp:
            assert b"=" not in value  # xtext


# --- greeting and EHLO ----------------------------------------------------------------------


def test_greeting():
    assert SubmissionPreAuth(make_settings()).greeting() == [
        Reply(b"220 mx.example.com ESMTP ready\r\n")]
    assert SubmissionPreAuth(make_settings(banner="")).greeting() == [
        Reply(b"220 mx.example.com ESMTP Ready.\r\n")]


def test_ehlo_before_tls_on_a_starttls_listener():
    m = machine(greet=False)
    assert m.client_helo is None
    assert m.receive(b"EHLO client.example\r\n") == [Reply(
        b"250-mx.example.com\r\n" + EHLO_DEFAULT
        + b"250-STARTTLS\r\n250 AUTH OAUTHBEARER XOAUTH2\r\n")]
    assert m.client_helo == "client.example"


def test_ehlo_over_tls_and_configured_keywords():
    m = machine(greet=False, tls_mode="implicit",
                ehlo=("PIPELINING", "STARTTLS", "auth", "SIZE", "bad word"))
    assert m.receive(b"ehlo [192.0.2.1]\r\n") == [Reply(
        b"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE\r\n"
        b"250 AUTH PLAIN LOGIN OAUTHBEARER XOAUTH2\r\n")]
    assert m.client_helo == "[192.0.2.1]"
    m = machine(greet=False, tls_mode="plain", sasl=("PLAIN",), ehlo=("X",))
    assert m.receive(b"EHLO c\r\n") == [Reply(b"250-mx.example.com\r\n250 X\r\n")]


def test_helo_and_syntax():
    m = machine(greet=False)
    assert m.receive(b"HELO old.example\r\n") == [Reply(b"250 mx.example.com\r\n")]
    assert m.client_helo == "old.example"
    for line in (b"EHLO\r\n", b"EHLO \r\n", b"EHLO a b\r\n", b"EHLO \xc3\xa4\r\n"):
        assert m.receive(line) == [Reply(b"501 5.5.4 Syntax: EHLO hostname\r\n")]
    assert m.receive(b"HELO\r\n") == [Reply(b"501 5.5.4 Syntax: HELO hostname\r\n")]
    assert m.client_helo == "old.example"


def test_noop_rset_quit():
    m = machine()
    assert m.receive(b"NOOP\r\n") == [Reply(b"250 2.0.0 OK\r\n")]
    assert m.receive(b"NOOP anything\r\n") == [Reply(b"250 2.0.0 OK\r\n")]
    assert m.receive(b"RSET\r\n") == [Reply(b"250 2.0.0 OK\r\n")]
    assert m.receive(b"RSET x\r\n") == [Reply(b"501 5.5.4 Syntax: RSET\r\n")]
    assert m.receive(b"QUIT\r\nNOOP\r\n") == [Reply(b"221 2.0.0 Bye\r\n"), Close()]
    assert m.receive(b"NOOP\r\n") == []


@pytest.mark.parametrize("line, reply", [
    (b"MAIL FROM:<a@example.com>\r\n", b"530 5.7.0 Authentication required\r\n"),
    (b"rcpt TO:<b@example.com>\r\n", b"530 5.7.0 Authentication required\r\n"),
    (b"DATA\r\n", b"530 5.7.0 Authentication required\r\n"),
    (b"VRFY alice\r\n", b"502 5.5.1 Command not implemented\r\n"),
    (b"XCLIENT ADDR=1.2.3.4\r\n", b"502 5.5.1 Command not implemented\r\n"),
    (b"\r\n", b"502 5.5.1 Command not implemented\r\n"),
    (b"BDAT x\r\n", b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"),
    (b"BDAT\r\n", b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"),
])
def test_refusals(line, reply):
    assert machine().receive(line) == [Reply(reply)]


def test_refused_bdat_chunk_is_skipped():
    m = machine()
    assert m.receive(b"BDAT 12 LAST\r\nNOOP\r\nNOOP\r\n") == [
        Reply(b"530 5.7.0 Authentication required\r\n")]
    assert m.receive(b"QUIT\r\n") == [Reply(b"221 2.0.0 Bye\r\n"), Close()]
    m = machine()
    m.receive(b"BDAT 100000 last\r\n")
    for _ in range(10):
        assert m.receive(b"x" * 10_000) == []
    assert len(m._buffer) == 0
    assert m.receive(b"NOOP\r\n") == [Reply(b"250 2.0.0 OK\r\n")]


def test_too_many_bad_commands_close_the_connection():
    events = machine().receive(b"FOO\r\n" * (MAX_BAD_COMMANDS + 5))
    assert events[-2:] == [Reply(b"421 4.7.0 mx.example.com Too many invalid commands\r\n"),
                           Close()]
    assert len(events) == MAX_BAD_COMMANDS + 2


# --- STARTTLS -------------------------------------------------------------------------------


def test_starttls_discards_injected_bytes_and_forgets_the_ehlo():
    m = machine()
    events = m.receive(b"STARTTLS\r\nAUTH PLAIN injected\r\n")
    assert events == [Reply(b"220 2.0.0 Ready to start TLS\r\n"), StartTLS()]
    assert m.receive(b"EHLO evil\r\n") == []
    assert m.tls_started() == []
    assert m.tls_active is True and m.client_helo is None
    assert m.receive(b"AUTH PLAIN\r\n") == [Reply(b"503 5.5.1 Send EHLO first\r\n")]
    ehlo = text(m.receive(b"EHLO again.example\r\n"))
    assert b"STARTTLS" not in ehlo and b"AUTH PLAIN LOGIN" in ehlo
    assert m.receive(b"STARTTLS\r\n") == [Reply(b"503 5.5.1 TLS already active\r\n")]


def test_starttls_not_offered_and_syntax():
    assert machine(tls_mode="plain").receive(b"STARTTLS\r\n") == [
        Reply(b"502 5.5.1 STARTTLS not available\r\n")]
    assert machine().receive(b"STARTTLS now\r\n") == [Reply(b"501 5.5.4 Syntax: STARTTLS\r\n")]


# --- AUTH -----------------------------------------------------------------------------------


def test_auth_plain_with_initial_response():
    m = tls_machine()
    events = m.receive(b"AUTH PLAIN " + b64(b"\0alice\0" + PASSWORD.encode()) + b"\r\n")
    assert events == [Authenticate(plain_credentials("alice", PASSWORD))]
    assert m.client_helo == "client.example"


def test_auth_plain_with_continuation():
    m = tls_machine()
    assert m.receive(b"auth plain\r\n") == [Reply(b"334 \r\n")]
    assert authenticates(m.receive(b64(b"\0alice\0pw") + b"\r\n"))[0].credentials.login == "alice"


def test_auth_login_prompts_as_outlook_uses_them():
    m = tls_machine()
    assert m.receive(b"AUTH LOGIN\r\n") == [Reply(b"334 VXNlcm5hbWU6\r\n")]
    assert m.receive(b64(b"alice@example.com") + b"\r\n") == [Reply(b"334 UGFzc3dvcmQ6\r\n")]
    assert m.receive(b64(PASSWORD.encode()) + b"\r\n") == [
        Authenticate(plain_credentials("alice@example.com", PASSWORD))]
    m = tls_machine()
    assert m.receive(b"AUTH LOGIN " + b64(b"alice") + b"\r\n") == [
        Reply(b"334 UGFzc3dvcmQ6\r\n")]


def test_auth_xoauth2_before_tls():
    response = b"user=alice@example.com\x01auth=Bearer tok\x01\x01"
    assert machine().receive(b"AUTH XOAUTH2 " + b64(response) + b"\r\n") == [
        Authenticate(decode_xoauth2(response))]


@pytest.mark.parametrize("command, reply", [
    (b"AUTH PLAIN\r\n",
     b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"),
    (b"AUTH LOGIN dXNlcg==\r\n",
     b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"),
    (b"AUTH CRAM-MD5\r\n", b"504 5.5.4 Unrecognized authentication type\r\n"),
    (b"AUTH XOAUTH2\r\n", b"504 5.5.4 Unrecognized authentication type\r\n"),
    (b"AUTH\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
    (b"AUTH PLAIN a b\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
])
def test_auth_refusals(command, reply):
    assert machine(sasl=("PLAIN", "LOGIN", "OAUTHBEARER")).receive(command) == [Reply(reply)]


def test_auth_needs_a_greeting():
    m = machine(greet=False, tls_mode="implicit")
    assert m.receive(b"AUTH PLAIN\r\n") == [Reply(b"503 5.5.1 Send EHLO first\r\n")]
    m.receive(b"HELO h\r\n")
    assert m.receive(b"AUTH PLAIN\r\n") == [Reply(b"334 \r\n")]


def test_auth_abort_and_malformed_responses():
    m = tls_machine(max_auth_attempts=2)
    m.receive(b"AUTH LOGIN\r\n")
    assert m.receive(b"*\r\n") == [Reply(b"501 5.7.0 Authentication aborted\r\n")]
    m.receive(b"AUTH PLAIN\r\n")
    assert m.receive(b"%%%\r\n") == [Reply(b"501 5.5.2 Invalid base64 data\r\n")]
    assert m.receive(b"AUTH PLAIN =\r\n") == [
        Reply(b"501 5.5.2 PLAIN response must have three NUL-separated fields\r\n"),
        Reply(b"421 4.7.0 mx.example.com Too many invalid authentication attempts\r\n"),
        Close()]


# --- outcomes, limits -----------------------------------------------------------------------


def test_pipelined_bytes_are_held_then_handed_over():
    m = tls_machine()
    events = m.receive(b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\nMAIL FROM:<a@example.com>\r\n")
    assert len(events) == 1 and authenticates(events)
    assert m.receive(b"RCPT TO:<b@example.com>\r\n") == []
    assert m.auth_succeeded() == b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"


def test_auth_failed_counts_and_resumes():
    m = tls_machine(max_auth_attempts=2)
    m.receive(b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\nNOOP\r\n")
    assert m.auth_failed(b"535 5.7.8 no\r\n") == [Reply(b"535 5.7.8 no\r\n"),
                                                  Reply(b"250 2.0.0 OK\r\n")]
    m.receive(b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n")
    assert m.auth_failed(b"535 5.7.8 no\r\n") == [
        Reply(b"535 5.7.8 no\r\n"),
        Reply(b"421 4.7.0 mx.example.com Too many invalid authentication attempts\r\n"),
        Close()]


def test_auth_unavailable_is_421_and_closes():
    m = tls_machine()
    m.receive(b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\nNOOP\r\n")
    assert m.auth_unavailable("destination node1: ConnectionRefusedError") == [
        Reply(b"421 4.3.0 mx.example.com destination node1: ConnectionRefusedError\r\n"),
        Close()]
    assert m.receive(b"NOOP\r\n") == []


def test_limits_and_timeout():
    m = machine()
    assert m.receive(b"NOOP " + b"x" * MAX_PREAUTH_LINE) == [
        Reply(b"421 4.7.0 mx.example.com Line too long\r\n"), Close()]
    assert machine().timed_out() == [
        Reply(b"421 4.4.2 mx.example.com Disconnected for inactivity\r\n"), Close()]
    m = tls_machine()
    m.receive(b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n")
    assert m.receive(b"x" * (MAX_PREAUTH_LINE + 1))[-1] == Close()


# --- properties -----------------------------------------------------------------------------


login_fields = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"),
                       min_size=1, max_size=12)


@given(login_fields, login_fields, st.sampled_from(["ir", "continuation", "login"]),
       st.lists(st.integers(0, 10_000), max_size=8))
def test_login_split_anywhere_gives_the_same_events(user, password, style, cuts):
    u, p = user.encode(), password.encode()
    if style == "ir":
        auth = b"AUTH PLAIN " + b64(b"\0" + u + b"\0" + p) + b"\r\n"
    elif style == "continuation":
        auth = b"AUTH PLAIN\r\n" + b64(b"\0" + u + b"\0" + p) + b"\r\n"
    else:
        auth = b"AUTH LOGIN\r\n" + b64(u) + b"\r\n" + b64(p) + b"\r\n"
    script = b"EHLO c.example\r\nNOOP\r\n" + auth + b"MAIL FROM:<>\r\n"
    whole_machine = machine(greet=False, tls_mode="implicit")
    whole = whole_machine.receive(script)
    chunked_machine = machine(greet=False, tls_mode="implicit")
    chunked = []
    for chunk in split(script, cuts):
        chunked += chunked_machine.receive(chunk)
    assert chunked == whole
    assert authenticates(whole) == [Authenticate(plain_credentials(user, password))]
    assert chunked_machine.auth_succeeded() == b"MAIL FROM:<>\r\n"


command_words = st.sampled_from([
    b"EHLO", b"HELO", b"AUTH", b"PLAIN", b"LOGIN", b"STARTTLS", b"MAIL", b"BDAT", b"3",
    b"LAST", b"NOOP", b"RSET", b"QUIT", b" ", b"\r\n", b"\n", b"*", b"=", b"AGFAYg==",
    b"c.example", b"\x00", b"\xff", b"250",
])


@hypothesis_settings(max_examples=300)
@given(st.one_of(st.binary(max_size=400), st.lists(command_words, max_size=60).map(b"".join)),
       st.lists(st.integers(0, 10_000), max_size=6), st.sampled_from(["starttls", "implicit"]))
def test_random_input_is_bounded_and_split_independent(data, cuts, tls_mode):
    whole = machine(greet=False, tls_mode=tls_mode).receive(data)
    chunked_machine = machine(greet=False, tls_mode=tls_mode)
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


# --- backend dialogue -----------------------------------------------------------------------

CREDS = plain_credentials("alice", PASSWORD)
AUTH = b"AUTH PLAIN " + b64(CREDS.response) + b"\r\n"
DOVECOT_EHLO = (b"250-node1.test\r\n250-8BITMIME\r\n250-AUTH PLAIN LOGIN\r\n250-BURL imap\r\n"
                b"250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n250-SIZE\r\n250-STARTTLS\r\n"
                b"250-PIPELINING\r\n250 XCLIENT ADDR PORT PROTO HELO LOGIN SESSION TTL "
                b"TIMEOUT FORWARD\r\n")
DOVECOT_XCLIENT_COMMAND = (b"XCLIENT ADDR=192.0.2.10 PORT=51000 SESSION=1-abcdef TTL=6 "
                           b"HELO=client.example PROTO=ESMTP\r\n")


def dialogue(tls_mode: str = "implicit", forwarding: ForwardingInfo | None = None,
             hide: bool = False, ehlo_name: str = "client.example") -> SubmissionBackendDialogue:
    return SubmissionBackendDialogue(BackendSettings(
        tls_mode=tls_mode, forwarding=forwarding, hide_auth_errors=hide, ehlo_name=ehlo_name))


def ready(**kwargs) -> SubmissionBackendDialogue:
    d = dialogue(**kwargs)
    assert d.receive(b"220 mx ESMTP\r\n") == [BackendSend(b"EHLO client.example\r\n")]
    assert d.receive(b"250-mx\r\n250 AUTH PLAIN\r\n") == [BackendReady()]
    return d


def test_backend_full_sequence_against_dovecot_replies():
    d = dialogue(tls_mode="starttls", forwarding=FORWARDING)
    assert d.receive(b"220-node1.test Dovecot\r\n220 ready.\r\n") == [
        BackendSend(b"EHLO client.example\r\n")]
    assert d.receive(DOVECOT_EHLO) == [BackendSend(b"STARTTLS\r\n")]
    assert d.receive(b"220 2.0.0 Begin TLS negotiation now.\r\n250 injected\r\n") == [
        BackendStartTLS()]
    assert d.receive(b"250 more cleartext\r\n") == []
    assert d.tls_started() == [BackendSend(b"EHLO client.example\r\n")]
    assert d.receive(DOVECOT_EHLO.replace(b"250-STARTTLS\r\n", b"")) == [
        BackendSend(DOVECOT_XCLIENT_COMMAND)]
    assert d.receive(b"220 node1.test Dovecot (Debian) ready.\r\n") == [
        BackendSend(b"EHLO client.example\r\n")]
    assert d.receive(DOVECOT_EHLO.replace(b"250-STARTTLS\r\n", b"")) == [BackendReady()]
    assert d.login(CREDS, None) == [BackendSend(AUTH)]
    assert d.receive(b"235 2.7.0 Logged in.\r\n") == [LoginSucceeded(AUTH_SUCCEEDED)]


def test_backend_xclient_to_postfix_sends_only_its_attributes():
    d = dialogue(forwarding=FORWARDING)
    d.receive(b"220 mx.test ESMTP Postfix\r\n")
    assert d.receive(b"250-mx.test\r\n250-AUTH PLAIN\r\n250 XCLIENT NAME ADDR PROTO HELO "
                     b"REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n") == [BackendSend(
        b"XCLIENT ADDR=192.0.2.10 PORT=51000 DESTADDR=198.51.100.1 DESTPORT=587 "
        b"HELO=client.example PROTO=ESMTP\r\n")]
    assert d.receive(b"250 2.0.0 Ok\r\n") == [BackendSend(b"EHLO client.example\r\n")]
    # XCLIENT is not repeated even though the EHLO still lists it.
    assert d.receive(b"250-mx.test\r\n250-AUTH PLAIN\r\n250 XCLIENT ADDR\r\n") == [
        BackendReady()]


def test_backend_xclient_refused_or_not_advertised():
    d = dialogue(forwarding=FORWARDING)
    d.receive(b"220 mx\r\n")
    d.receive(b"250-mx\r\n250-AUTH PLAIN\r\n250 XCLIENT ADDR\r\n")
    assert d.receive(b"550 5.7.0 insufficient authorization\r\n") == [
        BackendError("backend refused XCLIENT")]
    ready(forwarding=FORWARDING)
    d = dialogue(forwarding=FORWARDING)
    d.receive(b"220 mx\r\n")
    assert d.receive(b"250-mx\r\n250-AUTH PLAIN\r\n250 XCLIENT LOGIN NAME\r\n") == [
        BackendReady()]


def test_backend_ehlo_name_is_validated():
    d = dialogue(ehlo_name="bad name\r\nRSET")
    assert d.receive(b"220 mx\r\n") == [BackendSend(b"EHLO localhost\r\n")]


@pytest.mark.parametrize("replies, reason", [
    (b"554 5.7.1 go away\r\n", "backend refused the connection"),
    (b"* OK IMAP\r\n", "malformed response from backend"),
    (b"220 mx\r\n500 no\r\n", "backend refused EHLO"),
    (b"220 mx\r\n250 mx\r\n", "backend does not offer AUTH"),
    (b"220 mx\r\n250-mx\r\n251 AUTH PLAIN\r\n", "malformed response from backend"),
])
def test_backend_failures(replies, reason):
    assert dialogue().receive(replies)[-1] == BackendError(reason)


def test_backend_without_starttls_is_an_error_never_a_fallback():
    d = dialogue(tls_mode="starttls")
    d.receive(b"220 mx\r\n")
    assert d.receive(b"250-mx\r\n250 AUTH PLAIN\r\n") == [
        BackendError("backend does not offer STARTTLS")]
    d = dialogue(tls_mode="starttls")
    d.receive(b"220 mx\r\n")
    d.receive(b"250-mx\r\n250 STARTTLS\r\n")
    assert d.receive(b"454 4.7.0 TLS not available\r\n") == [
        BackendError("backend refused STARTTLS")]


def test_backend_replies_are_bounded():
    d = dialogue()
    d.receive(b"220 mx\r\n")
    events = []
    for _ in range(MAX_PREAUTH_LINE // 1000 + 1):
        events += d.receive(b"250-" + b"x" * 996 + b"\r\n")
    assert events == [BackendError("backend line too long")]


def test_login_failure_relayed_or_hidden():
    d = ready()
    d.login(CREDS, None)
    assert d.receive(b"535-5.7.8 Authentication\r\n535 5.7.8 failed.\r\n") == [
        LoginFailed(b"535-5.7.8 Authentication\r\n535 5.7.8 failed.\r\n")]
    d = ready(hide=True)
    d.login(CREDS, None)
    assert d.receive(b"454 4.7.0 Temporary failure\r\n") == [LoginFailed(HIDDEN_FAILURE)]
    d = ready()
    d.login(CREDS, None)
    assert d.receive(b"421 4.7.0 mx Too many errors\r\n") == [
        BackendError("backend closed the session")]


def test_login_with_long_response_and_unexpected_challenge():
    d = ready()
    long = Credentials("XOAUTH2", b"x" * 10_000)
    assert d.login(long, None) == [BackendSend(b"AUTH XOAUTH2\r\n")]
    assert d.receive(b"334 \r\n") == [BackendSend(b64(long.response) + b"\r\n")]
    assert d.receive(b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n") == [BackendSend(b"*\r\n")]
    assert d.receive(b"501 5.7.0 aborted\r\n") == [LoginFailed(HIDDEN_FAILURE)]
    d = ready()
    d.login(CREDS, None)
    assert d.receive(b"250 what\r\n") == [BackendError("unexpected response from backend")]


def test_backend_unexpected_while_ready_leftover_and_misuse():
    d = ready()
    assert d.receive(b"250 spontaneous\r\n") == [BackendError("unexpected response from backend")]
    d = ready()
    d.login(CREDS, None)
    assert d.receive(b"235 2.7.0 ok\r\n250 2.1.0 Ok\r\n") == [LoginSucceeded(AUTH_SUCCEEDED)]
    d.receive(b"354 go")
    assert d.leftover == b"250 2.1.0 Ok\r\n354 go"
    with pytest.raises(RuntimeError):
        dialogue().login(CREDS, None)
    with pytest.raises(RuntimeError):
        dialogue().tls_started()


PHASES = (b"220 mx ESMTP\r\n" + DOVECOT_EHLO + b"220 2.0.0 go\r\n",
          DOVECOT_EHLO + b"220 mx ready\r\n" + DOVECOT_EHLO,
          b"334 \r\n235 2.7.0 ok\r\n250 2.1.0 Ok\r\n")


@given(st.lists(st.integers(0, 600), max_size=8))
def test_backend_dialogue_split_independent(cuts):
    def run(chunks_per_phase):
        d = dialogue(tls_mode="starttls", forwarding=FORWARDING)
        events = []
        for chunk in chunks_per_phase[0]:
            events += d.receive(chunk)
        events += d.tls_started()
        for chunk in chunks_per_phase[1]:
            events += d.receive(chunk)
        events += d.login(Credentials("PLAIN", b"\0a\0" + b"p" * 10_000), None)
        for chunk in chunks_per_phase[2]:
            events += d.receive(chunk)
        return events, d.leftover
    whole = run([[phase] for phase in PHASES])
    assert run([split(phase, cuts) for phase in PHASES]) == whole
    events, leftover = whole
    assert events[-1] == LoginSucceeded(AUTH_SUCCEEDED)
    assert leftover == b"250 2.1.0 Ok\r\n"


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
