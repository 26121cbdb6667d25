"""The listener protocols as the configuration knows them (SPEC §2.3, §2.4): one entry each.

The configuration sits below the protocol machines (they read it), so it cannot ask them what
they are: an entry here is the configuration's half of registering a protocol, its line in
:data:`stalroute.protocols.PROTOCOLS` (or ``service.OTHER_LISTENERS``) the other half, and a
unit test keeps the two in step. Every protocol list the schema and its checks use is derived
from :data:`LISTENER_PROTOCOL_TABLE`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BANNER = "stalroute ready"
DEFAULT_IMAP_ADVERTISE = (
    "IMAP4rev2",
    "IMAP4rev1",
    "ENABLE",
    "SASL-IR",
    "LITERAL+",
    "ID",
    "UTF8=ACCEPT",
)
DEFAULT_SUBMISSION_EHLO = (
    "ENHANCEDSTATUSCODES",
    "8BITMIME",
    "SMTPUTF8",
    "PIPELINING",
    "CHUNKING",
    "SIZE",
)
DEFAULT_SIEVE_EXTENSIONS = (
    "fileinto",
    "reject",
    "envelope",
    "encoded-character",
    "vacation",
    "vacation-seconds",
    "subaddress",
    "comparator-i;ascii-numeric",
    "relational",
    "regex",
    "imap4flags",
    "copy",
    "include",
    "variables",
    "body",
    "enotify",
    "environment",
    "mailbox",
    "date",
    "index",
    "ihave",
    "duplicate",
    "mime",
    "foreverypart",
    "extracttext",
    "editheader",
)
DEFAULT_SIEVE_IMPLEMENTATION = "stalroute"


@dataclass(frozen=True)
class ListenerProtocol:
    """What the configuration knows of one ``protocol = "<name>"``."""

    name: str
    #: Sessions carry a login and are routed per account (SPEC §3); the others are relayed
    #: unparsed to ``routing.smtp_passthrough_destination``.
    interactive: bool
    #: Whether stalroute answers the pre-auth dialogue itself, with a
    #: ``[capabilities.<name>]`` section (HTTP has none).
    has_capabilities: bool = False
    #: The keys that section takes beyond ``sasl``, ``allow_plain_auth_without_tls`` and
    #: ``banner``, with their defaults.
    capability_defaults: Mapping[str, Any] = field(default_factory=dict)


LISTENER_PROTOCOL_TABLE = (
    ListenerProtocol("imap", interactive=True, has_capabilities=True,
                     capability_defaults={"advertise": DEFAULT_IMAP_ADVERTISE}),
    ListenerProtocol("pop3", interactive=True, has_capabilities=True),
    ListenerProtocol("managesieve", interactive=True, has_capabilities=True,
                     capability_defaults={"sieve": DEFAULT_SIEVE_EXTENSIONS,
                                          "implementation": DEFAULT_SIEVE_IMPLEMENTATION}),
    ListenerProtocol("submission", interactive=True, has_capabilities=True,
                     capability_defaults={"ehlo": DEFAULT_SUBMISSION_EHLO}),
    ListenerProtocol("smtp", interactive=False),
    ListenerProtocol("lmtp", interactive=False),
    ListenerProtocol("http", interactive=True),
)

LISTENER_PROTOCOLS = tuple(p.name for p in LISTENER_PROTOCOL_TABLE)
#: Protocols whose sessions carry a login (routed per account, SPEC §3).
INTERACTIVE_PROTOCOLS = tuple(p.name for p in LISTENER_PROTOCOL_TABLE if p.interactive)
#: Protocols relayed unparsed to ``routing.smtp_passthrough_destination``.
PASSTHROUGH_PROTOCOLS = tuple(p.name for p in LISTENER_PROTOCOL_TABLE if not p.interactive)
#: The keys each protocol's ``[capabilities.<proto>]`` takes beyond the common three.
CAPABILITY_KEYS: dict[str, tuple[str, ...]] = {
    p.name: tuple(p.capability_defaults) for p in LISTENER_PROTOCOL_TABLE if p.has_capabilities}
CAPABILITY_DEFAULTS: dict[str, Mapping[str, Any]] = {
    p.name: p.capability_defaults for p in LISTENER_PROTOCOL_TABLE if p.has_capabilities}
