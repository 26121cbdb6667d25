"""stalroute.protocols.imap: the pre-auth server machine and the backend dialogue (sans-IO)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

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
from stalroute.protocols.imap import (
    SPEC,
    IMAPBackendDialogue,
    IMAPCapabilities,
    IMAPPreAuth,
)
from stalroute.protocols.linebased import MAX_BAD_COMMANDS
from stalroute.protocols.lines import LineBuffer, LineTooLong
from stalroute.sasl import MECHANISMS, Credentials, decode_oauthbearer, plain_credentials
from tests.unit.preauth_checks import assert_well_formed, authenticates, split, text

PASSWORD = "s3cr3t"
DEFAULT_CAPS = b"IMAP4rev2 IMAP4rev1 ENABLE SASL-IR LITERAL+ ID UTF8=ACCEPT"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def make_settings(tls_mode: str = "starttls", sasl: tuple[str, ...] = MECHANISMS,
                  allow: bool = False, max_auth_attempts: int = 3,
                  advertise: tuple[str, ...] | None = None,
                  banner: str = "stalroute ready") -> PreAuthSettings[IMAPCapabilities]:
    own = IMAPCapabilities() if advertise is None else IMAPCapabilities(advertise=advertise)
    return PreAuthSettings(hostname="mx.example.com", tls_mode=tls_mode, sasl=sasl,
                           allow_plain_auth_without_tls=allow, banner=banner,
                           capabilities=own, max_auth_attempts=max_auth_attempts)


def machine(**kwargs) -> IMAPPreAuth:
    m = IMAPPreAuth(make_settings(**kwargs))
    m.greeting()
    return m


def tls_machine(**kwargs) -> IMAPPreAuth:
    return machine(tls_mode="implicit", **kwargs)


def test_spec_names_the_machines():
    assert (SPEC.name, SPEC.preauth, SPEC.dialogue) == ("imap", IMAPPreAuth, IMAPBackendDialogue)


# --- line buffer ----------------------------------------------------------------------------


def test_line_buffer_lines_and_blocks():
    buffer = LineBuffer(10)
    buffer.feed(b"one\r\ntwo\nthr")
    assert buffer.readline() == b"one"
    assert buffer.readline(keepends=True) == b"two\n"
    assert buffer.readline() is None
    buffer.feed(b"ee\r\n12345")
    assert buffer.readline() == b"three"
    assert buffer.read_exact(6) is None
    assert buffer.read_exact(5) == b"12345"
    assert len(buffer) == 0


def test_line_buffer_limits():
    buffer = LineBuffer(4)
    buffer.feed(b"abcd\r")
    assert buffer.readline() is None
    buffer.feed(b"\n")
    assert buffer.readline() == b"abcd"
    buffer.feed(b"abcde")
    with pytest.raises(LineTooLong):
        buffer.readline()
    buffer.clear()
    buffer.feed(b"abcde\n")
    with pytest.raises(LineTooLong):
        buffer.readline()
    buffer.clear()
    buffer.feed(b"x\ny")
    assert buffer.take_all() == b"x\ny"


@given(st.binary(max_size=200), st.lists(st.integers(1, 20), max_size=30))
def test_line_buffer_any_split_same_lines(data, sizes):
    def lines(chunks):
        buffer, out = LineBuffer(16), []
        try:
            for chunk in chunks:
                buffer.feed(chunk)
                while (line := buffer.readline()) is not None:
                    out.append(line)
                assert len(buffer) <= 17
        except LineTooLong:
            out.append("too long")
        return out
    chunks, offset = [], 0
    for size in sizes:
        chunks.append(data[offset:offset + size])
        offset += size
    chunks.append(data[offset:])
    assert lines(chunks) == lines([data])


# --- greeting and capabilities --------------------------------------------------------------


def test_greeting_on_a_starttls_listener():
    m = IMAPPreAuth(make_settings())
    assert m.tls_active is False
    assert m.greeting() == [Reply(
        b"* OK [CAPABILITY " + DEFAULT_CAPS + b" STARTTLS LOGINDISABLED AUTH=OAUTHBEARER"
        b" AUTH=XOAUTH2] stalroute ready\r\n")]


def test_greeting_on_an_implicit_tls_listener():
    m = IMAPPreAuth(make_settings(tls_mode="implicit"))
    assert m.tls_active is True
    assert m.greeting() == [Reply(
        b"* OK [CAPABILITY " + DEFAULT_CAPS + b" AUTH=PLAIN AUTH=LOGIN AUTH=OAUTHBEARER"
        b" AUTH=XOAUTH2] stalroute ready\r\n")]


def test_greeting_with_override_advertise_and_mechanisms():
    m = IMAPPreAuth(make_settings(tls_mode="plain", allow=True, sasl=("PLAIN",),
                                  advertise=("IMAP4rev1", "STARTTLS", "AUTH=CRAM-MD5",
                                             "logindisabled", "ID"),
                                  banner="multi\r\nline"))
    assert m.greeting() == [Reply(b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] multi??line\r\n")]
    assert IMAPPreAuth(make_settings(banner="")).greeting()[0].data.endswith(b"] Ready.\r\n")


def test_capability_noop_and_case_insensitivity():
    m = tls_machine()
    assert text(m.receive(b"a1 capability\r\n")) == (
        b"* CAPABILITY " + DEFAULT_CAPS + b" AUTH=PLAIN AUTH=LOGIN AUTH=OAUTHBEARER AUTH=XOAUTH2"
        b"\r\na1 OK CAPABILITY completed\r\n")
    assert m.receive(b"a2 NoOp\n") == [Reply(b"a2 OK NOOP completed\r\n")]
    assert m.receive(b"a3 NOOP extra\r\n") == [Reply(b"a3 BAD Invalid arguments\r\n")]


def test_logout():
    m = machine()
    events = m.receive(b"z LOGOUT\r\nafter NOOP\r\n")
    assert events == [Reply(b"* BYE Logging out\r\n"), Reply(b"z OK LOGOUT completed\r\n"),
                      Close()]
    assert m.receive(b"more NOOP\r\n") == []
    assert m.timed_out() == []


# --- ID -------------------------------------------------------------------------------------


ID_REPLY = b'* ID ("name" "stalroute")\r\n'


@pytest.mark.parametrize("command, ttl", [
    (b'i ID NIL\r\n', None),
    (b'i ID ()\r\n', None),
    (b'i ID ("name" "Thunderbird" "version" NIL)\r\n', None),
    (b'i ID ("X-Proxy-TTL" "4" "x-originating-ip" "1.2.3.4")\r\n', 4),
    (b'i id ("x-proxy-ttl" {1}\r\n5)\r\n', 5),
    (b'i ID ("x-proxy-ttl" "many")\r\n', None),
])
def test_id(command, ttl):
    m = machine()
    events = m.receive(command)
    assert text(events).endswith(ID_REPLY + b"i OK ID completed\r\n")
    assert m.proxy_ttl == ttl


@pytest.mark.parametrize("command", [
    b"i ID\r\n", b"i ID (\r\n", b'i ID ("name")\r\n', b'i ID ("name" "x" "y")\r\n',
    b'i ID ("name" "x") extra\r\n', b"i ID NOTNIL\r\n", b'i ID ("a" "b""c" "d")\r\n',
    b'i ID (name "x")\r\n',
])
def test_id_malformed(command):
    m = machine()
    assert m.receive(command) == [Reply(b"i BAD Invalid arguments\r\n")]
    assert m.proxy_ttl is None


def test_id_literal_is_invited():
    m = machine()
    assert m.receive(b'i ID ("name" {3}\r\n') == [Reply(b"+ Ready for literal data\r\n")]
    assert text(m.receive(b'abc)\r\n')) == ID_REPLY + b"i OK ID completed\r\n"


# --- STARTTLS -------------------------------------------------------------------------------


def test_starttls_discards_injected_bytes_and_changes_capabilities():
    m = machine()
    events = m.receive(b"s STARTTLS\r\ninjected LOGIN alice secret\r\n")
    assert events == [Reply(b"s OK Begin TLS negotiation now\r\n"), StartTLS()]
    assert m.receive(b"more injected NOOP\r\n") == []
    assert m.tls_started() == []
    assert m.tls_active is True
    caps = text(m.receive(b"c CAPABILITY\r\n"))
    assert b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps and b"AUTH=PLAIN" in caps
    assert m.receive(b"s2 STARTTLS\r\n") == [Reply(b"s2 BAD STARTTLS not available\r\n")]


def test_starttls_not_offered_on_other_modes():
    assert tls_machine().receive(b"s STARTTLS\r\n") == [Reply(b"s BAD STARTTLS not available\r\n")]
    plain = machine(tls_mode="plain")
    assert plain.receive(b"s STARTTLS\r\n") == [Reply(b"s BAD STARTTLS not available\r\n")]


def test_commands_before_starttls_in_the_same_packet_are_answered():
    m = machine()
    events = m.receive(b"a NOOP\r\nb STARTTLS\r\nc NOOP\r\n")
    assert events == [Reply(b"a OK NOOP completed\r\n"),
                      Reply(b"b OK Begin TLS negotiation now\r\n"), StartTLS()]


# --- LOGIN ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command, user, password", [
    (b"a LOGIN alice s3cr3t\r\n", "alice", "s3cr3t"),
    (b'a login "alice@example.com" "pa ss\\"w\\\\d"\r\n', "alice@example.com", 'pa ss"w\\d'),
    (b"a LOGIN {5}\r\nalice {6}\r\ns3cr3t\r\n", "alice", "s3cr3t"),
    (b"a LOGIN {5+}\r\nalice {9+}\r\nx\r\n{1}\r\ny\r\n", "alice", "x\r\n{1}\r\ny"),
    (b"a LOGIN alice] \"\xc3\xa4\"\r\n", "alice]", "ä"),
    (b'a LOGIN "j\xc3\xb6rg" {0}\r\n\r\n', None, None),
])
def test_login_variants(command, user, password):
    m = tls_machine()
    events = m.receive(command)
    found = authenticates(events)
    if user is None:  # empty password: refused locally, counted
        assert text(events) == (b"+ Ready for literal data\r\n"
                                b"a NO [AUTHENTICATIONFAILED] Empty user name or password\r\n")
        return
    assert found == [Authenticate(plain_credentials(user, password), context="a")]
    assert all(isinstance(e, (Reply, Authenticate)) for e in events)
    if b"{5}" in command:
        assert text(events) == b"+ Ready for literal data\r\n" * 2


def test_login_refused_without_tls_and_literal_not_invited():
    m = machine()
    assert m.receive(b"a LOGIN alice secret\r\n") == [Reply(
        b"a NO [PRIVACYREQUIRED] Cleartext authentication is not allowed without TLS\r\n")]
    events = m.receive(b"b LOGIN {5}\r\n")
    assert events == [Reply(
        b"b NO [PRIVACYREQUIRED] Cleartext authentication is not allowed without TLS\r\n")]
    assert m.receive(b"c NOOP\r\n") == [Reply(b"c OK NOOP completed\r\n")]


def test_login_allowed_without_tls_by_override():
    m = machine(tls_mode="plain", allow=True)
    assert authenticates(m.receive(b"a LOGIN alice secret\r\n"))


@pytest.mark.parametrize("command", [
    b"a LOGIN alice\r\n", b"a LOGIN\r\n", b"a LOGIN alice secret extra\r\n",
    b'a LOGIN "alice secret\r\n', b"a LOGIN (alice) secret\r\n", b'a LOGIN "a\\b" x\r\n',
    b"a LOGIN alice  secret\r\n",
])
def test_login_syntax_errors(command):
    assert tls_machine().receive(command) == [Reply(b"a BAD Invalid arguments\r\n")]


def test_login_with_invalid_utf8_is_a_counted_failure():
    m = tls_machine(max_auth_attempts=2)
    first = m.receive(b"a LOGIN alice \"\xff\xfe\"\r\n")
    assert first == [Reply(b"a NO [AUTHENTICATIONFAILED] Credentials are not valid UTF-8\r\n")]
    second = m.receive(b"b LOGIN alice \"\"\r\n")
    assert second[-2:] == [Reply(b"* BYE Too many invalid authentication attempts\r\n"), Close()]


def test_sync_literal_for_disallowed_commands_is_answered_at_once():
    m = tls_machine()
    assert m.receive(b"a SELECT {5}\r\n") == [
        Reply(b"a BAD Command not permitted before authentication\r\n")]
    assert m.receive(b"b NOOP {5}\r\n") == [Reply(b"b BAD Invalid arguments\r\n")]
    assert m.receive(b"c NOOP{5}\r\n") == [Reply(b"c BAD Invalid arguments\r\n")]
    assert m.receive(b"d AUTHENTICATE PLAIN {5}\r\n") == [Reply(b"d BAD Invalid arguments\r\n")]
    assert m.receive(b"{5}\r\n") == [Reply(b"* BAD Invalid tag\r\n")]


def test_nonsync_literal_of_a_refused_command_is_skipped():
    m = tls_machine()
    events = m.receive(b"a SELECT {11+}\r\nb LOGOUT\r\n\r\nc NOOP\r\n")
    assert events == [Reply(b"a BAD Command not permitted before authentication\r\n"),
                      Reply(b"c OK NOOP completed\r\n")]


# --- AUTHENTICATE ---------------------------------------------------------------------------


def test_authenticate_plain_with_initial_response():
    m = machine()
    m.receive(b"s STARTTLS\r\n")
    m.tls_started()
    events = m.receive(b"a AUTHENTICATE PLAIN " + b64(b"\0alice\0" + PASSWORD.encode())
                       + b"\r\n")
    assert events == [Authenticate(plain_credentials("alice", PASSWORD), context="a")]


def test_authenticate_plain_with_continuation():
    m = tls_machine()
    assert m.receive(b"a authenticate plain\r\n") == [Reply(b"+ \r\n")]
    events = m.receive(b64(b"\0alice\0pw") + b"\r\n")
    assert authenticates(events)[0].credentials.login == "alice"


def test_authenticate_login_prompts():
    m = tls_machine()
    assert m.receive(b"a AUTHENTICATE LOGIN\r\n") == [Reply(b"+ VXNlcm5hbWU6\r\n")]
    assert m.receive(b64(b"alice") + b"\r\n") == [Reply(b"+ UGFzc3dvcmQ6\r\n")]
    events = m.receive(b64(PASSWORD.encode()) + b"\r\n")
    assert events == [Authenticate(plain_credentials("alice", PASSWORD), context="a")]


def test_authenticate_login_with_initial_response():
    m = tls_machine()
    assert m.receive(b"a AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n") == [
        Reply(b"+ UGFzc3dvcmQ6\r\n")]


def test_authenticate_abort_is_bad_and_not_counted():
    m = tls_machine(max_auth_attempts=1)
    m.receive(b"a AUTHENTICATE PLAIN\r\n")
    assert m.receive(b"*\r\n") == [Reply(b"a BAD Authentication aborted\r\n")]
    assert m.receive(b"b NOOP\r\n") == [Reply(b"b OK NOOP completed\r\n")]


def test_authenticate_malformed_response_is_a_counted_failure():
    m = tls_machine()
    m.receive(b"a AUTHENTICATE PLAIN\r\n")
    assert m.receive(b"!!notbase64\r\n") == [
        Reply(b"a NO [AUTHENTICATIONFAILED] Invalid base64 data\r\n")]
    assert m.receive(b"b AUTHENTICATE PLAIN =\r\n") == [Reply(
        b"b NO [AUTHENTICATIONFAILED] PLAIN response must have three NUL-separated fields\r\n")]


def test_authenticate_oauth_is_allowed_without_tls():
    m = machine()
    response = b"n,a=user@example.com,\x01auth=Bearer tok\x01\x01"
    events = m.receive(b"a AUTHENTICATE OAUTHBEARER " + b64(response) + b"\r\n")
    assert events == [Authenticate(decode_oauthbearer(response), context="a")]


@pytest.mark.parametrize("command, reply", [
    (b"a AUTHENTICATE PLAIN\r\n",
     b"a NO [PRIVACYREQUIRED] Cleartext authentication is not allowed without TLS\r\n"),
    (b"a AUTHENTICATE login\r\n",
     b"a NO [PRIVACYREQUIRED] Cleartext authentication is not allowed without TLS\r\n"),
    (b"a AUTHENTICATE CRAM-MD5\r\n", b"a NO [CANNOT] Unsupported authentication mechanism\r\n"),
    (b"a AUTHENTICATE XOAUTH2\r\n", b"a NO [CANNOT] Unsupported authentication mechanism\r\n"),
    (b"a AUTHENTICATE\r\n", b"a BAD Invalid arguments\r\n"),
    (b"a AUTHENTICATE PLAIN x y\r\n", b"a BAD Invalid arguments\r\n"),
])
def test_authenticate_refusals(command, reply):
    m = machine(sasl=("PLAIN", "LOGIN", "OAUTHBEARER"))
    assert m.receive(command) == [Reply(reply)]


# --- errors and limits ----------------------------------------------------------------------


@pytest.mark.parametrize("line, reply", [
    (b"a SELECT INBOX\r\n", b"a BAD Command not permitted before authentication\r\n"),
    (b"a\r\n", b"a BAD Missing command\r\n"),
    (b"a \r\n", b"a BAD Missing command\r\n"),
    (b"\r\n", b"* BAD Invalid tag\r\n"),
    (b"a+b NOOP\r\n", b"* BAD Invalid tag\r\n"),
    (b"a*b NOOP\r\n", b"* BAD Invalid tag\r\n"),
    (b"\xc3\xa4 NOOP\r\n", b"* BAD Invalid tag\r\n"),
    (b"x" * 65 + b" NOOP\r\n", b"* BAD Invalid tag\r\n"),
    (b"x" * 64 + b" NOOP\r\n", b"x" * 64 + b" OK NOOP completed\r\n"),
    (b"a] NOOP\r\n", b"a] OK NOOP completed\r\n"),
])
def test_tags_and_unknown_commands(line, reply):
    assert machine().receive(line) == [Reply(reply)]


def test_too_many_bad_commands_close_the_connection():
    m = machine()
    events = m.receive(b"a FOO\r\n" * (MAX_BAD_COMMANDS + 5))
    assert events[-2:] == [Reply(b"* BYE Too many invalid commands\r\n"), Close()]
    assert len(events) == MAX_BAD_COMMANDS + 2


def test_line_too_long():
    m = machine()
    assert m.receive(b"a NOOP " + b"x" * MAX_PREAUTH_LINE) == [
        Reply(b"* BYE Line too long\r\n"), Close()]
    assert m.receive(b"\r\n") == []


def test_literal_announcement_too_long():
    m = tls_machine()
    assert m.receive(b"a LOGIN {%d}\r\n" % (MAX_PREAUTH_LINE + 1)) == [
        Reply(b"* BYE Line too long\r\n"), Close()]
    m = tls_machine()
    assert m.receive(b"a LOGIN {99999999999}\r\n")[-1] == Close()
    m = tls_machine()
    assert m.receive(b"a LOGIN {%s}\r\n" % (b"9" * 5000))[-1] == Close()


def test_whole_command_is_bounded():
    m = tls_machine()
    half = MAX_PREAUTH_LINE // 2
    assert m.receive(b"a LOGIN {%d+}\r\n" % half) == []
    m.receive(b"x" * half)
    assert m.receive(b" {%d+}\r\n" % half)[-1] == Close()


def test_timeout():
    m = machine()
    assert m.timed_out() == [Reply(b"* BYE Pre-authentication timeout\r\n"), Close()]
    assert m.receive(b"a NOOP\r\n") == []


# --- outcomes -------------------------------------------------------------------------------


def test_pipelined_bytes_are_held_then_handed_over():
    m = tls_machine()
    events = m.receive(b"a LOGIN alice pw\r\nb SELECT INBOX\r\n")
    assert authenticates(events) and len(events) == 1
    assert m.receive(b"c FETCH 1 BODY[]\r\n") == []
    assert m.auth_succeeded() == b"b SELECT INBOX\r\nc FETCH 1 BODY[]\r\n"
    with pytest.raises(RuntimeError):
        m.receive(b"x")


def test_auth_failed_counts_and_resumes_pipelined_commands():
    m = tls_machine(max_auth_attempts=2)
    m.receive(b"a LOGIN alice pw\r\nb NOOP\r\n")
    events = m.auth_failed(b"a NO [AUTHENTICATIONFAILED] nope\r\n")
    assert events == [Reply(b"a NO [AUTHENTICATIONFAILED] nope\r\n"),
                      Reply(b"b OK NOOP completed\r\n")]
    m.receive(b"c LOGIN alice pw\r\nd NOOP\r\n")
    assert m.auth_failed(b"c NO no\r\n") == [
        Reply(b"c NO no\r\n"), Reply(b"* BYE Too many invalid authentication attempts\r\n"),
        Close()]


def test_auth_unavailable_is_not_counted():
    m = tls_machine(max_auth_attempts=1)
    for tag in (b"a", b"b", b"c"):
        m.receive(tag + b" LOGIN alice pw\r\n")
        expected = (b"backend down??* BYE x" + b"y" * 500)[:200]
        assert m.auth_unavailable("backend down\r\n* BYE x" + "y" * 500) == [Reply(
            tag + b" NO [UNAVAILABLE] " + expected + b"\r\n")]
    m.receive(b"d LOGIN alice pw\r\n")
    assert m.auth_unavailable("") == [Reply(b"d NO [UNAVAILABLE] Service temporarily "
                                            b"unavailable\r\n")]


def test_outcomes_without_a_login_are_errors():
    m = tls_machine()
    with pytest.raises(RuntimeError):
        m.auth_failed(b"x")
    with pytest.raises(RuntimeError):
        m.auth_succeeded()


def test_too_much_pipelined_input_closes():
    m = tls_machine()
    m.receive(b"a LOGIN alice pw\r\n")
    assert m.receive(b"x" * MAX_PREAUTH_LINE) == []
    assert m.receive(b"x") == [
        Reply(b"* BYE Too much input before authentication completed\r\n"), Close()]
    assert m.auth_failed(b"a NO late\r\n") == []


# --- properties -----------------------------------------------------------------------------


def feed_all(m: IMAPPreAuth, chunks: list[bytes]) -> list:
    events = []
    for chunk in chunks:
        events += m.receive(chunk)
    return events


login_fields = st.one_of(
    st.from_regex(rb"\A[a-zA-Z0-9@.]{1,12}\Z"),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0\r\n"),
            min_size=1, max_size=12).map(str.encode),
)


def encode_astring(value: bytes, style: int) -> bytes:
    if style == 0 and value.isalnum() and value.isascii():
        return value
    if style == 1 and b"\r" not in value and b"\n" not in value:
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d%s}\r\n" % (len(value), b"+" if style == 2 else b"") + value


@given(login_fields, login_fields, st.integers(0, 3), st.integers(0, 3),
       st.lists(st.integers(0, 10_000), max_size=8))
def test_login_split_anywhere_gives_the_same_authenticate(user, password, style_u, style_p,
                                                         cuts):
    command = (b"t1 LOGIN " + encode_astring(user, style_u) + b" "
               + encode_astring(password, style_p) + b"\r\nt2 NOOP\r\n")
    whole = tls_machine().receive(command)
    chunked_machine = tls_machine()
    chunked = feed_all(chunked_machine, split(command, cuts))
    assert chunked == whole
    expected = plain_credentials(user.decode(), password.decode())
    assert authenticates(whole) == [Authenticate(expected, context="t1")]
    assert chunked_machine.auth_succeeded() == b"t2 NOOP\r\n"


command_words = st.sampled_from([
    b"a", b"b1", b"*", b"+", b" ", b"\r\n", b"\n", b"LOGIN", b"AUTHENTICATE", b"PLAIN",
    b"LOGIN", b"ID", b"NIL", b"(", b")", b'"', b"\\", b"{3}", b"{2+}", b"{70000}", b"CAPABILITY",
    b"STARTTLS", b"NOOP", b"LOGOUT", b"AGFAYg==", b"=", b"\x00", b"\xff", b"x-proxy-ttl",
])


@hypothesis_settings(max_examples=300)
@given(st.one_of(st.binary(max_size=400), st.lists(command_words, max_size=60).map(b"".join)),
       st.lists(st.integers(0, 10_000), max_size=6), st.sampled_from(["starttls", "implicit"]))
def test_random_input_is_bounded_and_split_independent(data, cuts, tls_mode):
    whole_machine = machine(tls_mode=tls_mode)
    whole = whole_machine.receive(data)
    chunked_machine = machine(tls_mode=tls_mode)
    chunked = []
    for chunk in split(data, cuts):
        chunked += chunked_machine.receive(chunk)
        assert len(chunked_machine._input.buffer) <= MAX_PREAUTH_LINE + 1
    assert chunked == whole
    assert_well_formed(whole)


@hypothesis_settings(max_examples=50)
@given(st.binary(min_size=1, max_size=5000), st.integers(1, 3000))
def test_large_random_input_never_overflows_the_buffer(data, chunk_size):
    m = machine(tls_mode="implicit")
    for offset in range(0, len(data) * 40, chunk_size):
        m.receive((data * 40)[offset:offset + chunk_size])
        assert len(m._input.buffer) <= MAX_PREAUTH_LINE + 1
        if m._state in ("closed", "pending"):
            break


# --- backend dialogue -----------------------------------------------------------------------

FORWARDING = ForwardingInfo(client_ip="192.0.2.10", client_port=51000, local_ip="198.51.100.1",
                            local_port=993, session_id="1-abcdef", ttl=6, client_tls=True)
ID_COMMAND = (b'SRx1 ID ("x-originating-ip" "192.0.2.10" "x-originating-port" "51000" '
              b'"x-connected-ip" "198.51.100.1" "x-connected-port" "993" "x-proxy-ttl" "6" '
              b'"x-session-id" "1-abcdef")\r\n')
CREDS = plain_credentials("alice", PASSWORD)
IR = b64(CREDS.response)


def dialogue(tls_mode: str = "implicit", forwarding: ForwardingInfo | None = None,
             hide: bool = False) -> IMAPBackendDialogue:
    return IMAPBackendDialogue(BackendSettings(tls_mode=tls_mode, forwarding=forwarding,
                                               hide_auth_errors=hide))


def ready(caps: bytes = b"IMAP4rev1 SASL-IR AUTH=PLAIN", **kwargs) -> IMAPBackendDialogue:
    d = dialogue(**kwargs)
    assert d.receive(b"* OK [CAPABILITY " + caps + b"] Dovecot ready.\r\n") == [BackendReady()]
    return d


def test_backend_greeting_with_capabilities_is_ready_at_once():
    ready()


def test_backend_capabilities_are_asked_when_not_in_the_greeting():
    d = dialogue()
    assert d.receive(b"* OK ready\r\n") == [BackendSend(b"SRx1 CAPABILITY\r\n")]
    assert d.receive(b"* CAPABILITY IMAP4rev1 SASL-IR\r\n") == []
    assert d.receive(b"SRx1 OK done\r\n") == [BackendReady()]


@pytest.mark.parametrize("greeting, reason", [
    (b"* PREAUTH welcome\r\n", "backend greeted with PREAUTH"),
    (b"* BYE go away\r\n", "backend refused the connection"),
    (b"+OK POP3 ready\r\n", "unexpected backend greeting"),
    (b"220 smtp\r\n", "unexpected backend greeting"),
])
def test_backend_bad_greetings(greeting, reason):
    assert dialogue().receive(greeting) == [BackendError(reason)]


def test_backend_capability_failures():
    d = dialogue()
    d.receive(b"* OK ready\r\n")
    assert d.receive(b"SRx1 NO nope\r\n") == [BackendError("backend refused CAPABILITY")]
    d = dialogue()
    d.receive(b"* OK ready\r\n")
    assert d.receive(b"SRx1 OK but none\r\n") == [BackendError("backend sent no capabilities")]
    d = dialogue()
    d.receive(b"* OK ready\r\n")
    assert d.receive(b"other OK\r\n") == [BackendError("unexpected response from backend")]
    d = dialogue()
    d.receive(b"* OK ready\r\n")
    assert d.receive(b"* BYE shutting down\r\n") == [BackendError("backend closed the session")]


def test_backend_starttls_sequence():
    d = dialogue(tls_mode="starttls")
    assert d.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS SASL-IR LOGINDISABLED] hi\r\n") == [
        BackendSend(b"SRx1 STARTTLS\r\n")]
    assert d.receive(b"SRx1 OK Begin TLS\r\nSRx9 OK [CAPABILITY SASL-IR] injected\r\n") == [
        BackendStartTLS()]
    assert d.receive(b"* more cleartext\r\n") == []
    assert d.tls_started() == [BackendSend(b"SRx2 CAPABILITY\r\n")]
    assert d.receive(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nSRx2 OK done\r\n") == [
        BackendReady()]
    # Capabilities from before TLS are forgotten: no SASL-IR now.
    assert d.login(CREDS, "a1") == [BackendSend(b"a1 AUTHENTICATE PLAIN\r\n")]


def test_backend_without_starttls_is_an_error_never_a_fallback():
    d = dialogue(tls_mode="starttls")
    assert d.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n") == [
        BackendError("backend does not offer STARTTLS")]
    d = dialogue(tls_mode="starttls")
    d.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")
    assert d.receive(b"SRx1 BAD no\r\n") == [BackendError("backend refused STARTTLS")]


def test_backend_id_forwarding():
    d = dialogue(forwarding=FORWARDING)
    assert d.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID] hi\r\n") == [
        BackendSend(ID_COMMAND)]
    assert d.receive(b'* ID ("name" {7}\r\nDovecot)\r\nSRx1 OK ID completed\r\n') == [
        BackendReady()]
    refused = dialogue(forwarding=FORWARDING)
    refused.receive(b"* OK [CAPABILITY IMAP4rev1 ID] hi\r\n")
    assert refused.receive(b"SRx1 NO no\r\n") == [BackendError("backend refused ID")]


def test_backend_id_only_when_advertised():
    ready(forwarding=FORWARDING)


def test_login_with_sasl_ir_relays_untagged_lines():
    d = ready()
    assert d.login(CREDS, "a1") == [BackendSend(b"a1 AUTHENTICATE PLAIN " + IR + b"\r\n")]
    assert d.receive(b"* CAPABILITY IMAP4rev2 IDLE\r\n") == []
    events = d.receive(b"a1 OK [CAPABILITY IMAP4rev2] Logged in\r\n* 3 EXISTS\r\n")
    assert events == [LoginSucceeded(
        b"* CAPABILITY IMAP4rev2 IDLE\r\na1 OK [CAPABILITY IMAP4rev2] Logged in\r\n")]
    assert d.leftover == b"* 3 EXISTS\r\n"
    d.receive(b"* 4 EXISTS\r\n")
    assert d.leftover == b"* 3 EXISTS\r\n* 4 EXISTS\r\n"


def test_login_without_sasl_ir_sends_the_response_on_continuation():
    d = ready(caps=b"IMAP4rev1")
    oauth = Credentials("XOAUTH2", b"auth=Bearer t\x01\x01", token="t")
    assert d.login(oauth, "x") == [BackendSend(b"x AUTHENTICATE XOAUTH2\r\n")]
    assert d.receive(b"+ \r\n") == [BackendSend(b64(oauth.response) + b"\r\n")]
    assert d.receive(b"x OK done\r\n") == [LoginSucceeded(b"x OK done\r\n")]


def test_empty_response_without_sasl_ir_is_an_empty_line():
    d = ready(caps=b"IMAP4rev1")
    d.login(Credentials("PLAIN", b""), "x")
    assert d.receive(b"+\r\n") == [BackendSend(b"\r\n")]


def test_unexpected_challenge_is_cancelled_and_fails():
    d = ready()
    d.login(Credentials("OAUTHBEARER", b"n,,\x01auth=Bearer t\x01\x01", token="t"), "o")
    assert d.receive(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n") == [BackendSend(b"*\r\n")]
    assert d.receive(b"o BAD aborted\r\n") == [
        LoginFailed(b"o NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")]


def test_login_failure_relayed_or_hidden():
    d = ready()
    d.login(CREDS, "a1")
    assert d.receive(b"a1 NO [AUTHENTICATIONFAILED] Wrong password for alice\r\n") == [
        LoginFailed(b"a1 NO [AUTHENTICATIONFAILED] Wrong password for alice\r\n")]
    hidden = ready(hide=True)
    hidden.login(CREDS, "a1")
    assert hidden.receive(b"* OK note\r\na1 BAD [x] details\r\n") == [
        LoginFailed(b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")]


def test_login_protocol_violations():
    d = ready()
    d.login(CREDS, "a1")
    assert d.receive(b"zz OK\r\n") == [BackendError("unexpected response from backend")]
    d = ready()
    d.login(CREDS, "a1")
    assert d.receive(b"a1 PREAUTH\r\n") == [BackendError("unexpected response from backend")]


def test_backend_literal_cannot_fake_a_tagged_result():
    d = ready()
    d.login(CREDS, "a1")
    fake = b"a1 OK fake\r\n"
    assert d.receive(b"* 1 FETCH (BODY[] {%d}\r\n" % len(fake) + fake + b")\r\n") == []
    assert d.receive(b"a1 NO real\r\n") == [LoginFailed(
        b"* 1 FETCH (BODY[] {12}\r\na1 OK fake\r\n)\r\na1 NO real\r\n")]


def test_backend_lines_are_bounded():
    d = dialogue()
    assert d.receive(b"* OK " + b"x" * MAX_PREAUTH_LINE + b"\r\n") == [
        BackendError("backend line too long")]
    d = ready()
    d.login(CREDS, "a1")
    events = []
    for _ in range(MAX_PREAUTH_LINE // 1000 + 1):
        events += d.receive(b"* OK " + b"x" * 1000 + b"\r\n")
    assert events == [BackendError("backend sent too much before the login result")]


def test_backend_misuse():
    d = dialogue()
    with pytest.raises(RuntimeError):
        d.login(CREDS, "a1")
    with pytest.raises(RuntimeError):
        d.tls_started()


BACKEND_SCRIPT = (b"* OK Dovecot ready.\r\n",
                  b"* CAPABILITY IMAP4rev1 STARTTLS ID\r\nSRx1 OK done\r\n",
                  b"SRx2 OK go\r\n")


@given(st.lists(st.integers(0, 200), max_size=8))
def test_backend_dialogue_split_independent(cuts):
    def run(chunks_per_phase):
        d = dialogue(tls_mode="starttls", forwarding=FORWARDING)
        events = []
        for chunks in chunks_per_phase[:3]:
            for chunk in chunks:
                events += d.receive(chunk)
        events += d.tls_started()
        for chunk in chunks_per_phase[3]:
            events += d.receive(chunk)
        events += d.login(CREDS, "c1")
        for chunk in chunks_per_phase[4]:
            events += d.receive(chunk)
        return events, d.leftover
    after_tls = b"* CAPABILITY IMAP4rev1 ID\r\nSRx3 OK\r\n* ID NIL\r\nSRx4 OK\r\n"
    login = b"+ \r\n"
    outcome = b"* CAPABILITY X\r\nc1 OK in\r\n* 1 EXISTS\r\n"
    phases = [*BACKEND_SCRIPT, after_tls, login + outcome]
    whole = run([[phase] for phase in phases])
    assert run([split(phase, cuts) for phase in phases]) == whole
    events, leftover = whole
    assert events[-1] == LoginSucceeded(b"* CAPABILITY X\r\nc1 OK in\r\n")
    assert leftover == b"* 1 EXISTS\r\n"


@given(st.binary(max_size=600), st.sampled_from(["implicit", "starttls"]))
def test_backend_random_bytes_never_raise(data, tls_mode):
    d = dialogue(tls_mode=tls_mode, forwarding=FORWARDING)
    events = d.receive(data)
    for event in events:
        assert isinstance(event, (BackendSend, BackendStartTLS, BackendReady, BackendError))
    if events and isinstance(events[-1], BackendReady):
        d.login(CREDS, "t")
        for event in d.receive(data):
            assert isinstance(event, (BackendSend, LoginSucceeded, LoginFailed, BackendError))
