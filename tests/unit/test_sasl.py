"""stalroute.sasl: strict decoders, the LOGIN/PLAIN/OAuth exchange, secret hygiene."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, strategies as st

from stalroute.sasl import (
    CLEARTEXT_MECHANISMS,
    LOGIN_PASSWORD_PROMPT,
    LOGIN_USERNAME_PROMPT,
    MAX_ENCODED_RESPONSE,
    MECHANISMS,
    Challenge,
    Credentials,
    SASLAborted,
    SASLError,
    SASLExchange,
    decode_base64,
    decode_oauthbearer,
    decode_plain,
    decode_xoauth2,
    encode_base64,
    plain_credentials,
)

PASSWORD = "s3cr3t-Pa55"
OAUTHBEARER_RFC = (b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
                   b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01")
XOAUTH2_GOOGLE = (b"user=someuser@example.com\x01"
                  b"auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_constants():
    assert MECHANISMS == ("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2")
    assert CLEARTEXT_MECHANISMS == {"PLAIN", "LOGIN"}
    assert LOGIN_USERNAME_PROMPT == b64(b"Username:")
    assert LOGIN_PASSWORD_PROMPT == b64(b"Password:")


def test_aborted_is_a_sasl_error():
    assert issubclass(SASLAborted, SASLError)
    assert issubclass(SASLError, ValueError)


# --- base64 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, decoded", [
    (b"", b""), (b"=", b""), (b"YQ==", b"a"), (b"YWI=", b"ab"), (b"YWJj", b"abc"),
])
def test_decode_base64_accepts_canonical(text, decoded):
    assert decode_base64(text) == decoded


@pytest.mark.parametrize("text", [
    b"YQ", b"YQ=", b"Y Q==", b"YQ==\n", b"YQ==YQ==", b"==", b"YQ=a", b"YR==", b"Y===",
    b"YQ==\x00", b"Y-_=", b"*", b"\xff\xfe",
])
def test_decode_base64_rejects_noncanonical(text):
    with pytest.raises(SASLError):
        decode_base64(text)


def test_decode_base64_has_a_size_cap():
    with pytest.raises(SASLError, match="too long"):
        decode_base64(b"A" * (MAX_ENCODED_RESPONSE + 4))


def test_encode_base64_empty_is_equals_sign():
    assert encode_base64(b"") == b"="
    assert encode_base64(b"abc") == b"YWJj"


@given(st.binary(max_size=300))
def test_base64_round_trip(data):
    assert decode_base64(encode_base64(data)) == data


@given(st.binary(max_size=200))
def test_decode_base64_raises_only_sasl_error(data):
    try:
        decode_base64(data)
    except SASLError:
        pass


# --- PLAIN ----------------------------------------------------------------------------------


def test_plain_credentials_builds_a_plain_response():
    creds = plain_credentials("alice@example.com", PASSWORD)
    assert creds == Credentials("PLAIN", b"\0alice@example.com\0" + PASSWORD.encode(),
                                login="alice@example.com", token=None)
    with_authzid = plain_credentials("admin", PASSWORD, authzid="alice")
    assert with_authzid.response == b"alice\0admin\0" + PASSWORD.encode()
    assert with_authzid.login == "admin"


@pytest.mark.parametrize("authcid, password, authzid", [
    ("", PASSWORD, ""), ("alice", "", ""), ("al\0ice", PASSWORD, ""),
    ("alice", "pa\0ss", ""), ("alice", PASSWORD, "x\0"), ("alice", "\udcff", ""),
])
def test_plain_credentials_rejects_unusable_fields(authcid, password, authzid):
    with pytest.raises(SASLError) as info:
        plain_credentials(authcid, password, authzid)
    assert PASSWORD not in str(info.value)


def test_repr_never_shows_the_secret():
    creds = plain_credentials("alice", PASSWORD)
    assert repr(creds) == "Credentials(mechanism='PLAIN', login='alice')"
    assert PASSWORD not in str(creds)
    oauth = decode_oauthbearer(OAUTHBEARER_RFC)
    assert "vF9dft4" not in repr(oauth)


def test_decode_plain():
    creds = decode_plain(b"\0alice\0" + PASSWORD.encode())
    assert (creds.mechanism, creds.login, creds.token) == ("PLAIN", "alice", None)
    assert creds.response == b"\0alice\0" + PASSWORD.encode()
    assert decode_plain("zid\0jörg\0pw".encode()).login == "jörg"


@pytest.mark.parametrize("data", [
    b"alice\0secret", b"\0alice\0secret\0", b"\0\0secret", b"\0alice\0", b"",
    b"\0al\xffice\0secret", b"\0alice\0se\xffcret", b"\xff\0alice\0secret",
])
def test_decode_plain_rejects(data):
    with pytest.raises(SASLError) as info:
        decode_plain(data)
    assert "secret" not in str(info.value)


@given(st.text(min_size=1).filter(lambda s: "\0" not in s),
       st.text(min_size=1).filter(lambda s: "\0" not in s),
       st.text().filter(lambda s: "\0" not in s))
def test_plain_round_trip(authcid, password, authzid):
    try:
        creds = plain_credentials(authcid, password, authzid)
    except SASLError:  # lone surrogates cannot be UTF-8
        return
    assert decode_plain(creds.response) == creds
    assert repr(creds) == f"Credentials(mechanism='PLAIN', login={authcid!r})"


# --- OAUTHBEARER / XOAUTH2 ------------------------------------------------------------------


def test_decode_oauthbearer_rfc7628_example():
    creds = decode_oauthbearer(OAUTHBEARER_RFC)
    assert creds.mechanism == "OAUTHBEARER"
    assert creds.login == "user@example.com"
    assert creds.token == "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
    assert creds.response == OAUTHBEARER_RFC


def test_decode_oauthbearer_without_authzid_and_escapes():
    assert decode_oauthbearer(b"n,,\x01auth=Bearer tok\x01\x01").login is None
    assert decode_oauthbearer(b"y,,\x01auth=bearer tok\x01\x01").token == "tok"
    escaped = decode_oauthbearer(b"n,a=we=2Cird=3Dname=3D2C@x,\x01auth=Bearer t\x01\x01")
    assert escaped.login == "we,ird=name=2C@x"


@pytest.mark.parametrize("data", [
    b"", b"n", b"n,", b"n,,", b"n,,auth=Bearer t\x01\x01", b"n,,\x01auth=Bearer t\x01",
    b"p=tls-unique,,\x01auth=Bearer t\x01\x01", b"x,,\x01auth=Bearer t\x01\x01",
    b"n,u=bob,\x01auth=Bearer t\x01\x01", b"n,a=,\x01auth=Bearer t\x01\x01",
    b"n,a=b=41ob,\x01auth=Bearer t\x01\x01", b"n,a=bob=,\x01auth=Bearer t\x01\x01",
    b"n,,\x01\x01", b"n,,\x01host=x\x01\x01", b"n,,\x01auth=Basic dXNlcg==\x01\x01",
    b"n,,\x01auth=Bearer \x01\x01", b"n,,\x01auth=Bearer a b\x01\x01",
    b"n,,\x01auth=Bearer t\x01auth=Bearer u\x01\x01", b"n,,\x01au th=x\x01auth=Bearer t\x01\x01",
    b"n,,\x01noequals\x01auth=Bearer t\x01\x01", b"n,,\x01auth=Bearer t\xff\x01\x01",
    b"n,a=\xff@x,\x01auth=Bearer t\x01\x01",
])
def test_decode_oauthbearer_rejects(data):
    with pytest.raises(SASLError):
        decode_oauthbearer(data)


def test_decode_xoauth2():
    creds = decode_xoauth2(XOAUTH2_GOOGLE)
    assert (creds.mechanism, creds.login) == ("XOAUTH2", "someuser@example.com")
    assert creds.token == "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
    assert decode_xoauth2(b"auth=Bearer tok\x01\x01").login is None
    assert decode_xoauth2(b"user=\x01auth=Bearer tok\x01\x01").login is None


@pytest.mark.parametrize("data", [
    b"", b"\x01", b"user=a@b\x01\x01", b"user=a@b\x01auth=Bearer t\x01",
    b"user=a@b\x01auth=Bearer t", b"user=a@b\x01auth=Token t\x01\x01",
])
def test_decode_xoauth2_rejects(data):
    with pytest.raises(SASLError):
        decode_xoauth2(data)


@pytest.mark.parametrize("decoder", [decode_plain, decode_oauthbearer, decode_xoauth2])
@given(data=st.binary(max_size=200))
def test_decoders_raise_only_sasl_error(decoder, data):
    try:
        creds = decoder(data)
    except SASLError:
        return
    assert creds.response == data


@given(st.lists(st.sampled_from([b"n", b"y", b",", b"a=", b"=2C", b"=3D", b"=", b"\x01",
                                 b"auth", b"=Bearer ", b"user", b"tok", b"@", b" ", b"\xff"]),
                max_size=20))
def test_oauth_decoders_on_structured_noise(parts):
    data = b"".join(parts)
    for decoder in (decode_oauthbearer, decode_xoauth2):
        try:
            creds = decoder(data)
        except SASLError:
            continue
        assert creds.token and " " not in creds.token


# --- the exchange ---------------------------------------------------------------------------


def test_plain_with_initial_response():
    exchange = SASLExchange("PLAIN", b64(b"\0alice\0" + PASSWORD.encode()))
    creds = exchange.step()
    assert isinstance(creds, Credentials) and creds.login == "alice"
    with pytest.raises(SASLError, match="finished"):
        exchange.step(b"x")


def test_plain_without_initial_response():
    exchange = SASLExchange("plain", None)
    assert exchange.mechanism == "PLAIN"
    assert exchange.step() == Challenge(b"")
    assert exchange.step(b64(b"\0bob\0pw")).login == "bob"


def test_plain_empty_initial_response_is_a_malformed_plain():
    with pytest.raises(SASLError):
        SASLExchange("PLAIN", b"=").step()


def test_login_exchange_is_rebuilt_as_plain():
    exchange = SASLExchange("LOGIN", None)
    assert exchange.step() == Challenge(LOGIN_USERNAME_PROMPT)
    assert exchange.step(b64(b"alice")) == Challenge(LOGIN_PASSWORD_PROMPT)
    creds = exchange.step(b64(PASSWORD.encode()))
    assert creds == plain_credentials("alice", PASSWORD)


def test_login_initial_response_is_the_username():
    exchange = SASLExchange("LOGIN", b64(b"alice"))
    assert exchange.step() == Challenge(LOGIN_PASSWORD_PROMPT)
    assert exchange.step(b64(b"pw")).login == "alice"


def test_login_empty_initial_response_counts_as_absent():
    exchange = SASLExchange("LOGIN", b"=")
    assert exchange.step() == Challenge(LOGIN_USERNAME_PROMPT)


@pytest.mark.parametrize("lines", [[b""], [b64(b"alice"), b""], [b64(b"\xff")],
                                   [b64(b"alice"), b64(b"\xff")], [b"!!"]])
def test_login_rejects_empty_or_invalid_fields(lines):
    exchange = SASLExchange("LOGIN", None)
    exchange.step()
    with pytest.raises(SASLError):
        for line in lines:
            exchange.step(line)


@pytest.mark.parametrize("mechanism, steps_before_abort", [
    ("PLAIN", 0), ("LOGIN", 0), ("LOGIN", 1), ("OAUTHBEARER", 0), ("XOAUTH2", 0),
])
def test_star_aborts(mechanism, steps_before_abort):
    exchange = SASLExchange(mechanism, None)
    exchange.step()
    for _ in range(steps_before_abort):
        exchange.step(b64(b"alice"))
    with pytest.raises(SASLAborted):
        exchange.step(b"*")
    with pytest.raises(SASLError):
        exchange.step(b"*")


def test_oauth_exchanges():
    assert SASLExchange("OAUTHBEARER", b64(OAUTHBEARER_RFC)).step().login == "user@example.com"
    exchange = SASLExchange("XOAUTH2", None)
    assert exchange.step() == Challenge(b"")
    assert exchange.step(b64(XOAUTH2_GOOGLE)).mechanism == "XOAUTH2"


def test_exchange_misuse_and_unknown_mechanisms():
    with pytest.raises(SASLError, match="Unsupported"):
        SASLExchange("CRAM-MD5", None)
    with pytest.raises(SASLError):
        SASLExchange("PLAIN", None).step(b"early")
    exchange = SASLExchange("PLAIN", None)
    exchange.step()
    with pytest.raises(SASLError):
        exchange.step()


def test_errors_do_not_leak_the_password():
    exchange = SASLExchange("LOGIN", b64(b"alice"))
    exchange.step()
    with pytest.raises(SASLError) as info:
        exchange.step(b64(PASSWORD.encode() + b"\xff"))
    assert PASSWORD not in str(info.value) and PASSWORD not in repr(info.value)


@given(st.sampled_from(MECHANISMS), st.none() | st.binary(max_size=80),
       st.lists(st.binary(max_size=80), max_size=5))
def test_exchange_is_bounded_and_raises_only_sasl_error(mechanism, initial, lines):
    exchange = SASLExchange(mechanism, initial)
    outcomes = []
    try:
        outcomes.append(exchange.step())
        for line in lines:
            outcomes.append(exchange.step(line))
    except SASLError:
        pass
    assert len(outcomes) <= 3
    assert all(isinstance(o, Challenge) for o in outcomes[:-1])


@given(st.sampled_from(MECHANISMS), st.lists(st.binary(max_size=40).map(b64), max_size=6))
def test_exchange_on_valid_base64(mechanism, lines):
    exchange = SASLExchange(mechanism, None)
    try:
        outcome = exchange.step()
        for line in lines:
            outcome = exchange.step(line)
            if isinstance(outcome, Credentials):
                assert outcome.mechanism in ("PLAIN", "OAUTHBEARER", "XOAUTH2")
                break
    except SASLError:
        pass
