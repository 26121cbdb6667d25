"""stalroute.identity: which account a login names, and how it may be routed and logged."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, strategies as st

from stalroute.identity import (
    MAX_IDENTIFIER_LENGTH,
    MAX_TOKEN_LENGTH,
    InvalidIdentifier,
    account_from_credentials,
    account_from_token,
    normalize_identifier,
    redact,
    routing_identifier,
    strip_master_user,
)
from stalroute.sasl import Credentials, plain_credentials


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwt(payload: object, header: object = None) -> str:
    head = b64url(json.dumps(header or {"alg": "RS256", "typ": "JWT"}).encode())
    return f"{head}.{b64url(json.dumps(payload).encode())}.c2lnbmF0dXJl"


def stalwart(address: str, body: str = "AAECAwQFBgcICQ") -> str:
    return f"sw1.{body}.{b64url(address.encode())}"


def oauthbearer(login: str | None, token: str) -> Credentials:
    return Credentials("OAUTHBEARER", b"", login=login, token=token)


def xoauth2(login: str | None, token: str) -> Credentials:
    return Credentials("XOAUTH2", b"", login=login, token=token)


# --- accounts from credentials --------------------------------------------------------------


def test_plain_and_login_route_on_the_login():
    assert account_from_credentials(plain_credentials("alice%admin", "pw")) == "alice%admin"


def test_oauthbearer_prefers_an_address_authzid():
    token = jwt({"email": "token@example.com"})
    assert account_from_credentials(oauthbearer("a@example.com", token)) == "a@example.com"
    assert account_from_credentials(oauthbearer("alice", token)) == "token@example.com"
    assert account_from_credentials(oauthbearer(None, token)) == "token@example.com"
    assert account_from_credentials(oauthbearer(None, "opaque")) is None


def test_xoauth2_prefers_user_when_present():
    token = stalwart("token@example.com")
    assert account_from_credentials(xoauth2("bob", token)) == "bob"
    assert account_from_credentials(xoauth2(None, token)) == "token@example.com"


def test_configured_claim_is_passed_through():
    token = jwt({"mail": "m@example.com", "email": "e@example.com"})
    assert account_from_credentials(oauthbearer(None, token), "mail") == "m@example.com"
    assert account_from_credentials(oauthbearer(None, token)) == "e@example.com"


# --- tokens ---------------------------------------------------------------------------------


def test_stalwart_token_footer():
    assert account_from_token(stalwart("jane@example.org"), "email") == "jane@example.org"
    assert account_from_token(stalwart("jörg@exämple.org"), "email") == "jörg@exämple.org"


@pytest.mark.parametrize("token", [
    "sw1.", "sw1.body", "sw1.body.", "sw1.body.!!!", "sw1.body.QQ.QQ", "sw1.body.A",
    "sw1.body." + b64url(b"\xff\xfe"),
])
def test_broken_stalwart_tokens(token):
    assert account_from_token(token, "email") is None


def test_jwt_claim_order():
    payload = {"sub": "s@x", "unique_name": "n@x", "upn": "u@x", "preferred_username": "p@x",
               "email": "e@x", "custom": "c@x"}
    assert account_from_token(jwt(payload), "custom") == "c@x"
    order = ["email", "preferred_username", "upn", "unique_name", "sub"]
    for index, claim in enumerate(order):
        remaining = {key: payload[key] for key in order[index:]}
        assert account_from_token(jwt(remaining), "email") == payload[claim]


def test_jwt_first_string_holding_an_address_wins():
    payload = {"email": 42, "preferred_username": "not-an-address", "upn": ["a@b"],
               "unique_name": "n@example.com", "sub": "s@example.com"}
    assert account_from_token(jwt(payload), "email") == "n@example.com"
    assert account_from_token(jwt({"sub": "12345"}), "email") is None


@pytest.mark.parametrize("token", [
    "", "opaque-token", "a.b", "a.!!!.c", "a." + b64url(b"not json") + ".c",
    "a." + b64url(b"[1,2]") + ".c", "a." + b64url(b'"x@y"') + ".c",
    "a." + b64url(b"[" * 5000 + b"]" * 5000) + ".c", "a." + b64url(b"\xff\xfe\x00") + ".c",
    "a.QQ===.c",
])
def test_garbage_tokens_give_none(token):
    assert account_from_token(token, "email") is None


def test_padded_jwt_segment_is_tolerated():
    payload = base64.urlsafe_b64encode(json.dumps({"email": "p@x"}).encode()).decode()
    assert account_from_token(f"h.{payload}.s", "email") == "p@x"


def test_oversized_tokens_are_not_decoded():
    padding = "x" * MAX_TOKEN_LENGTH
    assert account_from_token(jwt({"email": "a@b", "pad": padding}), "email") is None


@given(st.text(max_size=300))
def test_account_from_token_never_raises(token):
    result = account_from_token(token, "email")
    assert result is None or isinstance(result, str)


@given(st.binary(max_size=200))
def test_account_from_token_never_raises_on_encoded_noise(noise):
    for token in (f"sw1.x.{b64url(noise)}", f"h.{b64url(noise)}.s"):
        result = account_from_token(token, "email")
        assert result is None or isinstance(result, str)


@given(st.dictionaries(st.sampled_from(["email", "sub", "upn", "x"]),
                       st.one_of(st.text(max_size=20), st.integers(), st.none(),
                                 st.lists(st.text(max_size=5), max_size=2))))
def test_jwt_results_always_hold_an_address(payload):
    result = account_from_token(jwt(payload), "email")
    assert result is None or "@" in result


# --- routing identifiers --------------------------------------------------------------------


@pytest.mark.parametrize("login, separators, expected", [
    ("alice%admin", ["%"], "alice"),
    ("alice", ["%"], "alice"),
    ("alice*admin%x", ["%", "*"], "alice"),
    ("alice%admin*x", ["*", "%"], "alice"),
    ("alice%admin", [], "alice%admin"),
    ("alice%admin", [""], "alice%admin"),
    ("a::b", ["::"], "a"),
])
def test_strip_master_user(login, separators, expected):
    assert strip_master_user(login, separators) == expected


def test_routing_identifier_strips_then_normalizes():
    assert routing_identifier("Alice@Example.COM%Admin", ["%"], "lowercase") == "alice@example.com"
    assert routing_identifier("Alice@Example.COM", ["%"], "none") == "Alice@Example.COM"
    assert routing_identifier("ÄLICE@x", ["%"], "lowercase") == "älice@x"


@pytest.mark.parametrize("login", [
    "", "%admin", "ali ce", "alice\t", "alice\r\nXCLIENT ADDR=1.2.3.4", 'ali"ce', "ali'ce",
    "ali\\ce", "ali\x00ce", "ali\x7fce", "ali\u200bce", "ali\u2028ce", "ali\u00a0ce",
    "x" * (MAX_IDENTIFIER_LENGTH + 1),
])
def test_routing_identifier_rejects(login):
    with pytest.raises(InvalidIdentifier):
        routing_identifier(login, ["%"], "none")


def test_normalize_identifier():
    assert normalize_identifier("Bob@X", "lowercase") == "bob@x"
    with pytest.raises(InvalidIdentifier):
        normalize_identifier("bob x", "none")
    with pytest.raises(ValueError):
        normalize_identifier("bob", "uppercase")


@given(st.text(max_size=100), st.lists(st.sampled_from(["%", "*", "+"]), max_size=3),
       st.sampled_from(["none", "lowercase"]))
def test_routing_identifier_is_safe_to_inject(login, separators, normalize):
    try:
        identifier = routing_identifier(login, separators, normalize)
    except InvalidIdentifier:
        return
    assert identifier
    assert not any(char.isspace() or char in "\"'\\" or ord(char) < 32 or char == "\x7f"
                   for char in identifier)
    assert normalize_identifier(identifier, normalize) == identifier


# --- redaction ------------------------------------------------------------------------------


def test_redact_shape_and_stability():
    redacted = redact("alice@example.com")
    assert redacted.startswith("ali…#") and len(redacted) == len("ali…#") + 8
    assert redact("alice@example.com") == redacted
    assert redact("alice@example.org") != redacted
    assert "example" not in redacted


@pytest.mark.parametrize("identifier, prefix", [("", ""), ("a", ""), ("ab", "a"),
                                                ("abcd", "ab"), ("abcdef", "abc")])
def test_redact_never_shows_more_than_half(identifier, prefix):
    assert redact(identifier).split("…#")[0] == prefix


def test_redact_is_log_safe():
    assert redact("\r\n\x1bxyz").startswith("???…#")
    assert redact("\udcff\udcfe").startswith("?…#")  # lone surrogates neither raise nor print


@given(st.text(max_size=50))
def test_redact_never_raises_and_is_one_line(identifier):
    redacted = redact(identifier)
    assert "\n" not in redacted and "\r" not in redacted
    assert len(redacted) <= 3 + 2 + 8
