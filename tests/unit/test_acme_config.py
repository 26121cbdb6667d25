"""``[acme.<name>]``, ``[tls.certificate.<name>] acme``, ``[cluster.roles]`` and
``[server] state_directory`` (SPEC §2.11, §2.13): strict, every problem named by its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stalroute.config import ConfigError, parse_config
from tests.harness.pki import CertificateAuthority

DIRECTORY = "https://acme.example.net/directory"


def document(acme: dict[str, Any] | None = None, *, certificate: dict[str, Any] | None = None,
             listeners: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """An IMAPS listener whose certificate comes from ``[acme.le]``."""
    doc: dict[str, Any] = {
        "routing": {"default_destination": "main"},
        "mapping": {"source": "file", "file": {"path": "mappings.tsv"}},
        "destination": {"main": {"host": "backend.example.com",
                                 "protocol": {"imap": {"port": 993, "tls": "implicit"},
                                              "http": {"port": 443, "tls": "implicit"}}}},
        "listener": listeners if listeners is not None else {
            "imaps": {"protocol": "imap", "bind": ["127.0.0.1:1993"], "tls": "implicit"}},
        "tls": {"certificate": {"mail": certificate if certificate is not None
                                else {"acme": "le"}}},
        "acme": {"le": acme if acme is not None else {"directory": DIRECTORY,
                                                      "domains": ["mail.example.com"]}},
    }
    doc.update(top)
    return doc


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    (tmp_path / "mappings.tsv").write_text("")
    return tmp_path


def problems(base_dir: Path, doc: dict[str, Any], **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base_dir, {}, **kw)
    return [str(p) for p in info.value.problems]


def acme_with(**keys: Any) -> dict[str, Any]:
    return {"directory": DIRECTORY, "domains": ["mail.example.com"], **keys}


def test_defaults_and_subjects(base_dir: Path) -> None:
    config = parse_config(document(), base_dir, {})
    acme = config.acme["le"]
    assert acme.name == "le" and acme.directory == DIRECTORY
    assert acme.domains == ("mail.example.com",) and acme.contact == ()
    assert (acme.challenge, acme.key_type, acme.renew_before) == ("tls-alpn-01", "ecdsa-p256",
                                                                 None)
    assert acme.ca_file is None and acme.eab_kid is None and acme.eab_hmac_key is None
    certificate = config.tls.certificates["mail"]
    assert certificate.acme == "le" and certificate.cert is None and certificate.key is None
    assert certificate.subjects == ("mail.example.com",)  # the domains, when not given
    assert config.server.state_directory == Path("/var/lib/stalroute")
    assert config.cluster.roles.acme_renew == () and config.cluster.roles.purge == ()
    assert config.warnings == ()


def test_every_key(base_dir: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    doc = document(acme_with(
        contact=["mailto:hostmaster@example.com", "mailto:ops@example.com"],
        domains=["Mail.Example.com.", "imap.example.org"], challenge="tls-alpn-01",
        key_type="rsa-2048", renew_before="30d", ca_file=str(ca.cert_path),
        eab_kid="kid-1", eab_hmac_key="c2VjcmV0LWtleQ"),
        server={"state_directory": "state"},
        cluster={"node_id": 2, "roles": {"acme_renew": [2, 3], "purge": [1]}})
    config = parse_config(doc, base_dir, {})
    acme = config.acme["le"]
    assert acme.domains == ("mail.example.com", "imap.example.org")
    assert config.tls.certificates["mail"].subjects == ("mail.example.com", "imap.example.org")
    assert acme.contact == ("mailto:hostmaster@example.com", "mailto:ops@example.com")
    assert (acme.key_type, acme.renew_before, acme.ca_file) == ("rsa-2048", 30 * 86400.0,
                                                                ca.cert_path)
    assert (acme.eab_kid, acme.eab_hmac_key) == ("kid-1", "c2VjcmV0LWtleQ")
    assert "c2VjcmV0LWtleQ" not in repr(acme)
    assert config.server.state_directory == base_dir / "state"
    assert config.cluster.roles.acme_renew == (2, 3) and config.cluster.roles.purge == (1,)


@pytest.mark.parametrize(("acme", "expected"), [
    ({"domains": ["a.example"]}, ["acme.le.directory: required key is missing"]),
    (acme_with(directory="http://acme.example/dir"),
     ['acme.le.directory: must be a https://… URL, got scheme "http"']),
    ({"directory": DIRECTORY}, ["acme.le.domains: required key is missing"]),
    (acme_with(domains=[]), ["acme.le.domains: must not be empty"]),
    (acme_with(domains=["ok.example", "bad_name.example", "-x.example", "10.0.0.1"]),
     ['acme.le.domains[1]: "bad_name.example" is not a DNS name',
      'acme.le.domains[2]: "-x.example" is not a DNS name',
      'acme.le.domains[3]: "10.0.0.1" is an IP address']),
    (acme_with(domains=["*.example.org"]),
     ['acme.le.domains[0]: "*.example.org": a wildcard name needs the dns-01 challenge']),
    (acme_with(domains=["a.example", "A.example"]),
     ['acme.le.domains[1]: "A.example" is listed twice']),
    (acme_with(contact="mailto:a@example.com"), ["acme.le.contact: must be an array"]),
    (acme_with(contact=["a@example.com", "mailto:nobody", "https://x"]),
     ['acme.le.contact[0]: "a@example.com" is not a mailto: URL',
      'acme.le.contact[1]: "mailto:nobody" must name one e-mail address',
      'acme.le.contact[2]: "https://x" is not a mailto: URL']),
    (acme_with(challenge="dns-01"),
     ['acme.le.challenge: "dns-01" is not one of "tls-alpn-01", "http-01"']),
    (acme_with(key_type="rsa-4096"),
     ['acme.le.key_type: "rsa-4096" is not one of "ecdsa-p256", "rsa-2048"']),
    (acme_with(renew_before="30"), ["acme.le.renew_before: \"30\" is not a duration"]),
    (acme_with(renew_before="0s"), ["acme.le.renew_before: must be greater than zero"]),
    (acme_with(ca_file="missing.pem"), ['acme.le.ca_file: "missing.pem" (resolved to']),
    (acme_with(eab_kid="kid"), ["acme.le.eab_hmac_key: eab_kid and eab_hmac_key"]),
    (acme_with(eab_hmac_key="a2V5"), ["acme.le.eab_kid: eab_kid and eab_hmac_key"]),
    (acme_with(eab_kid="kid", eab_hmac_key="not base64!"),
     ["acme.le.eab_hmac_key: must be the base64url-encoded MAC key"]),
    (acme_with(renew_befor="30d"),
     ['acme.le.renew_befor: unknown key (did you mean "renew_before"?)']),
])
def test_acme_problems(base_dir: Path, acme: dict[str, Any], expected: list[str]) -> None:
    found = problems(base_dir, document(acme))
    assert len(found) == len(expected), found
    for problem, start in zip(found, expected):
        assert problem.startswith(start), (problem, start)


def test_ca_file_not_checked_with_skip_files(base_dir: Path) -> None:
    config = parse_config(document(acme_with(ca_file="missing.pem")), base_dir, {},
                          check_files=False)
    assert config.acme["le"].ca_file == base_dir / "missing.pem"


def test_ca_file_must_be_pem(base_dir: Path) -> None:
    (base_dir / "junk.pem").write_text("junk")
    found = problems(base_dir, document(acme_with(ca_file="junk.pem")))
    assert len(found) == 1 and found[0].startswith("acme.le.ca_file: ")
    assert "is not a PEM bundle of certificates" in found[0]


def test_acme_entry_must_be_a_table(base_dir: Path) -> None:
    doc = document()
    doc["acme"] = {"le": "https://acme.example.net"}
    found = problems(base_dir, doc)
    assert "acme.le: must be a table, not a string" in found


@pytest.mark.parametrize(("certificate", "expected"), [
    ({"acme": "lee"}, ['tls.certificate.mail.acme: "lee" is not an [acme.<name>] entry '
                       '(did you mean "le"?)']),
    ({"acme": "other"}, ['tls.certificate.mail.acme: "other" is not an [acme.<name>] entry '
                         '(declared: le)']),
    ({"acme": "le", "cert": "c.pem"}, ["tls.certificate.mail.cert: not used with acme"]),
    ({"acme": "le", "key": "k.pem"}, ["tls.certificate.mail.key: not used with acme"]),
    ({}, ["tls.certificate.mail: needs cert and key (PEM files) or acme"]),
    ({"cert": "c.pem"}, ["tls.certificate.mail.key: required key is missing"]),
])
def test_certificate_forms(base_dir: Path, certificate: dict[str, Any],
                           expected: list[str]) -> None:
    found = [p for p in problems(base_dir, document(certificate=certificate), check_files=False)]
    assert len(found) == len(expected), found
    for problem, start in zip(found, expected):
        assert problem.startswith(start), (problem, start)


def test_unused_acme_entry_is_a_warning(base_dir: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    leaf = ca.issue("mail.example.com")
    doc = document(certificate={"cert": str(leaf.cert_path), "key": str(leaf.key_path)})
    config = parse_config(doc, base_dir, {})
    assert [str(w) for w in config.warnings] == [
        'acme.le: no [tls.certificate.<name>] uses this entry (acme = "le"): nothing is ordered']


def test_tls_alpn_01_needs_an_implicit_tls_listener(base_dir: Path) -> None:
    plain = {"imap": {"protocol": "imap", "bind": ["127.0.0.1:1143"], "tls": "starttls"}}
    found = problems(base_dir, document(listeners=plain))
    assert len(found) == 1
    assert found[0].startswith('acme.le.challenge: "tls-alpn-01" is answered on implicit-TLS '
                               "listeners")


def test_http_01_needs_a_plain_http_listener(base_dir: Path) -> None:
    found = problems(base_dir, document(acme_with(challenge="http-01")))
    assert len(found) == 1
    assert found[0].startswith('acme.le.challenge: "http-01" is answered on plain HTTP listeners')
    listeners = {"imaps": {"protocol": "imap", "bind": ["127.0.0.1:1993"], "tls": "implicit"},
                 "web": {"protocol": "http", "bind": ["127.0.0.1:1080"], "tls": "plain"}}
    config = parse_config(document(acme_with(challenge="http-01"), listeners=listeners),
                          base_dir, {})
    assert config.acme["le"].challenge == "http-01"


@pytest.mark.parametrize(("roles", "expected"), [
    ({"acme_renew": [0]}, ["cluster.roles.acme_renew[0]: must be at least 1, not 0"]),
    ({"acme_renew": [2, 2]}, ["cluster.roles.acme_renew[1]: 2 is listed twice"]),
    ({"purge": ["1"]}, ["cluster.roles.purge[0]: must be an integer, not a string"]),
    ({"purge": 1}, ["cluster.roles.purge: must be an array, not an integer"]),
    ({"renew": [1]}, ['cluster.roles.renew: unknown key (did you mean "acme_renew"?)']),
])
def test_cluster_roles_problems(base_dir: Path, roles: Any, expected: list[str]) -> None:
    found = problems(base_dir, document(cluster={"roles": roles}))
    assert found == expected


def test_cluster_roles_must_be_a_table(base_dir: Path) -> None:
    found = problems(base_dir, document(cluster={"roles": [1, 2]}))
    assert found == ["cluster.roles: must be a table, not an array"]
