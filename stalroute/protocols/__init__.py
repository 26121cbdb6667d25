"""The protocols the shared pipeline serves: one module each, registered here once.

Adding a protocol is its module (two sans-IO machines, its capability settings and a
:class:`~stalroute.protocols.base.ProtocolSpec`) plus one line below; the session, the
backend leg and the capability probes find it through :data:`PROTOCOLS`.
"""

from typing import Any

from stalroute.protocols import imap, managesieve, passthrough, pop3, submission
from stalroute.protocols.base import ProtocolSpec

#: Every protocol by listener ``protocol`` name; each spec has its own settings type.
PROTOCOLS: dict[str, ProtocolSpec[Any]] = {spec.name: spec for spec in (
    imap.SPEC,
    pop3.SPEC,
    managesieve.SPEC,
    submission.SPEC,
    passthrough.SMTP,
    passthrough.LMTP,
)}
