"""Where ACME state lives (SPEC §2.13): the account keys, the issued certificates with their
keys, and the leases that let one node of a ``[cluster.roles]`` task act at a time.

One small interface, :class:`SharedStore`, with one implementation per place: a 0600
directory for a single instance, and the coordinator's Redis or PostgreSQL for a fleet, so that
every instance reads what the renewing node wrote. Values are opaque bytes; the keys are built by
the functions below, never by hand.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred


class SharedStore(Protocol):
    """Key/value storage with expiry and leases. Every method fires on the reactor thread."""

    def get(self, key: str) -> Deferred[bytes | None]:
        """The value stored under ``key``, or None (missing or expired)."""

    def put(self, key: str, value: bytes, ttl: float | None = None) -> Deferred[None]:
        """Store ``value`` under ``key`` (replacing it); with ``ttl`` it expires after so
        many seconds."""

    def delete(self, key: str) -> Deferred[None]:
        """Remove ``key`` (no error if it is missing)."""

    def acquire_lease(self, task: str, holder: str, ttl: float) -> Deferred[bool]:
        """Take the lease of ``task`` for ``holder`` for ``ttl`` seconds, or renew it if
        ``holder`` already has it. False while another holder's lease is unexpired."""

    def release_lease(self, task: str, holder: str) -> Deferred[None]:
        """Give the lease of ``task`` up if ``holder`` has it (else nothing)."""

    def purge(self) -> Deferred[int]:
        """Remove every expired value and lease; fires with how many were removed."""

    def close(self) -> Deferred[None]:
        """Release connections and files."""


def account_key(acme_name: str) -> str:
    """The ACME account private key (PEM) of ``[acme.<acme_name>]``."""
    return f"acme/account/{acme_name}"


def certificate_key(certificate_name: str) -> str:
    """The issued chain and its private key of ``[tls.certificate.<certificate_name>]``
    (JSON: ``{"chain": PEM, "key": PEM}``)."""
    return f"acme/certificate/{certificate_name}"


def challenge_key(token: str) -> str:
    """The material of one pending challenge (JSON), by its token."""
    return f"acme/challenge/{token}"
