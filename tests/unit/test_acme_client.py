"""The pieces of the ACME order flow that need no server (the flow itself runs against pebble
in tests/integration/test_acme.py)."""

from __future__ import annotations

import josepy as jose
from acme import challenges, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from stalroute.acme.client import (
    TLSALPN01,
    TLSALPN01Response,
    _describe,
    new_account_key,
    new_certificate_key,
)


def test_key_types() -> None:
    account = serialization.load_pem_private_key(new_account_key(), None)
    assert isinstance(account, ec.EllipticCurvePrivateKey) and account.curve.name == "secp256r1"
    ecdsa = serialization.load_pem_private_key(new_certificate_key("ecdsa-p256"), None)
    assert isinstance(ecdsa, ec.EllipticCurvePrivateKey)
    rsa_key = serialization.load_pem_private_key(new_certificate_key("rsa-2048"), None)
    assert isinstance(rsa_key, rsa.RSAPrivateKey) and rsa_key.key_size == 2048


def test_tls_alpn_01_challenges_parse_and_answer_with_an_empty_object() -> None:
    token = jose.b64encode(b"x" * 32).decode()
    challenge = challenges.Challenge.from_json({"type": "tls-alpn-01", "token": token})
    assert isinstance(challenge, TLSALPN01)
    key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    assert challenge.validation(key) == challenge.key_authorization(key)
    assert challenge.validation(key).startswith(token + ".")
    response = challenge.response(key)
    assert isinstance(response, TLSALPN01Response)
    assert response.to_partial_json() == {}


def test_server_problems_are_described_by_type_and_detail() -> None:
    problem = messages.Error.with_code("rejectedIdentifier", detail="mail.test is forbidden")
    assert _describe(problem) == ("urn:ietf:params:acme:error:rejectedIdentifier: "
                                  "mail.test is forbidden")
    assert _describe(ValueError("bad")) == "ValueError: bad"
