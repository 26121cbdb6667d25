"""Redis URLs: what ``redis[s]://`` URLs name, parsed and checked without a connection.

The Redis mapping store, the Redis bus of ``[cluster]`` and ``stalroute check`` read them.
Apart from :mod:`stalroute.mapping.redis`, so that reading one loads neither txredisapi nor
the reactor it installs.

URL: ``redis[s]://[[user]:password@]host[:port][/db]``; query parameters ``db``,
``ssl_ca_certs`` (a PEM file of CAs to trust instead of the system store) and
``ssl_cert_reqs`` (``required``, the default, or ``none`` to skip verification), named as
in redis-py. ``rediss://`` verifies the server's certificate against the host name or IP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from OpenSSL import SSL
from twisted.internet import ssl

from stalroute.mapping import InvalidStoreSetting, redact_url

DEFAULT_PORT = 6379
_QUERY_PARAMETERS = ("db", "ssl_ca_certs", "ssl_cert_reqs")
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class RedisTarget:
    """Where and how to connect, parsed from the URL."""

    host: str
    port: int
    db: int | None
    username: str | None
    password: str | None
    tls: bool
    ca_file: Path | None = None
    verify: bool = True


#: The configuration key a URL comes from unless the caller names another (errors name it).
MAPPING_KEY = "mapping.redis.url"


def parse_redis_url(url: str, key: str = MAPPING_KEY) -> RedisTarget:
    """Parse ``url``; InvalidStoreSetting (named by ``key``) when it cannot work."""

    def invalid(problem: str) -> InvalidStoreSetting:
        return InvalidStoreSetting(f"{key}: {problem} (in {redact_url(url)})")

    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if unknown := sorted(set(query) - set(_QUERY_PARAMETERS)):
        raise invalid(f"unknown parameter {unknown[0]!r}; known: {', '.join(_QUERY_PARAMETERS)}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise invalid("the port is not a number") from None
    if not parts.hostname:
        raise invalid("no host")
    db_text = parts.path.strip("/") or query.get("db", "")
    if db_text and not db_text.isdigit():
        raise invalid(f"the database must be a number, not {db_text!r}")
    reqs = query.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("required", "none"):
        raise invalid("ssl_cert_reqs must be 'required' or 'none'")
    ca_file = Path(query["ssl_ca_certs"]) if query.get("ssl_ca_certs") else None
    return RedisTarget(
        host=parts.hostname,
        port=port,
        db=int(db_text) if db_text else None,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=parts.scheme.lower() == "rediss",
        ca_file=ca_file,
        verify=reqs == "required",
    )


def tls_options(target: RedisTarget, key: str = MAPPING_KEY) -> Any:
    """Client TLS settings for ``rediss://`` (InvalidStoreSetting, named by ``key``, for an
    unusable CA file)."""
    if not target.verify:
        return ssl.CertificateOptions(verify=False)
    trust = None
    if target.ca_file is not None:
        try:
            blocks = _PEM_CERTIFICATE.findall(target.ca_file.read_bytes())
            if not blocks:
                raise ValueError("no PEM certificate in the file")
            trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
        except (OSError, ValueError, SSL.Error) as exc:
            raise InvalidStoreSetting(
                f"{key}: ssl_ca_certs {target.ca_file}: {exc}") from exc
    return ssl.optionsForClientTLS(target.host, trustRoot=trust)


def connection_settings(url: str, key: str = MAPPING_KEY) -> tuple[RedisTarget, Any]:
    """``url`` parsed, and the TLS settings to connect with (False for ``redis://``);
    InvalidStoreSetting, named by ``key``, when either cannot work."""
    target = parse_redis_url(url, key)
    return target, (tls_options(target, key) if target.tls else False)
