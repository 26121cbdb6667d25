"""One module per protocol; each exports a :class:`~stalroute.protocols.base.ProtocolSpec`."""

from stalroute.protocols import imap, managesieve, passthrough, pop3, submission
from stalroute.protocols.base import ProtocolSpec

#: The interactive protocols the shared pipeline serves, by listener ``protocol`` name.
PROTOCOLS: dict[str, ProtocolSpec] = {
    spec.name: spec for spec in (imap.SPEC, pop3.SPEC, managesieve.SPEC, submission.SPEC,
                                 passthrough.SMTP, passthrough.LMTP)}
