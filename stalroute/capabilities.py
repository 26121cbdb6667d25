"""What the destinations honour before login, and so what stalroute advertises (SPEC §2.4 [ext]).

A client reads stalroute's pre-auth capabilities and relies on them after login, when it
talks to whichever backend its account lives on.  So where the operator did not set
``advertise``, ``ehlo``, ``sieve`` or ``sasl`` explicitly, stalroute advertises a configured
word only when every destination serving the protocol offers it.  What a destination offers
is learnt by a probe: a backend leg opened exactly as for a login (PROXY header, TLS or
STARTTLS, forwarding), whose dialogue records the capabilities it read, closed without
logging in.  Destinations are probed at start, after each reload and every
:data:`PROBE_INTERVAL`; one that does not answer keeps its last answer, and one that never
answered counts as offering :data:`FALLBACK` (what every known-good backend offers).
``stalroute check`` uses the same probe to warn where an explicit list promises more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from stalroute.backend import BackendConnector, BackendUnavailable, ClientInfo
from stalroute.config import Config, DestinationConfig, ProtocolCapabilities
from stalroute.logs import logger
from stalroute.protocols import PROTOCOLS
from stalroute.protocols.imap import MANAGED_CAPABILITIES
from stalroute.protocols.submission import MANAGED_KEYWORDS
from stalroute.tls import TLSDetails

log = logger("stalroute.capabilities")

#: Seconds between two probes of every destination.
PROBE_INTERVAL = 300.0

#: A destination's answer for one protocol: upper-cased words by ``[capabilities.<proto>]``
#: key, as :attr:`~stalroute.protocols.base.BackendDialogue.offered` gives them.
Offer = Mapping[str, frozenset[str]]

#: The list each protocol advertises besides ``sasl``.
LIST_KEYS = {"imap": "advertise", "submission": "ehlo", "managesieve": "sieve"}

#: A client mechanism is honoured when the backend offers the one its login is replayed as
#: (SPEC §3 step 7: SASL LOGIN becomes PLAIN).
REPLAYED_AS = {"LOGIN": "PLAIN"}

#: What a destination that never answered a probe is taken to offer, by protocol: the
#: defaults that Dovecot 2.3, Stalwart, Postfix and Cyrus all honour (so not IMAP4rev2,
#: UTF8=ACCEPT, SMTPUTF8, the OAuth mechanisms, Pigeonhole's optional extensions).
FALLBACK: dict[str, Offer] = {
    "imap": {"advertise": frozenset({"IMAP4REV1", "ENABLE", "SASL-IR", "LITERAL+", "ID"}),
             "sasl": frozenset({"PLAIN"})},
    "pop3": {"sasl": frozenset({"PLAIN"}), "capa": frozenset()},
    "submission": {"ehlo": frozenset({"ENHANCEDSTATUSCODES", "8BITMIME", "PIPELINING",
                                      "CHUNKING", "SIZE"}),
                   "sasl": frozenset({"PLAIN"})},
    "managesieve": {"sieve": frozenset(word.upper() for word in (
        "fileinto reject envelope encoded-character vacation subaddress "
        "comparator-i;ascii-numeric relational regex imap4flags copy include variables body "
        "enotify environment mailbox date index ihave duplicate mime foreverypart "
        "extracttext").split()),
                    "sasl": frozenset({"PLAIN"}), "notify": frozenset({"MAILTO"})},
}


# --- what to advertise (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class Advertised:
    """What the listeners of one protocol announce before login."""

    #: ``[capabilities.<proto>]`` with the lists the operator left unset narrowed down.
    capabilities: ProtocolCapabilities
    #: ManageSieve: the NOTIFY methods every destination offers (lower-case).
    notify: tuple[str, ...] = ()
    #: POP3: the CAPA words every destination lists (``UTF8`` is advertised only then).
    capa: frozenset[str] = frozenset()


def learnt_keys(protocol: str) -> tuple[str, ...]:
    """The ``[capabilities.<proto>]`` lists that a destination can fail to honour."""
    return ("sasl", LIST_KEYS[protocol]) if protocol in LIST_KEYS else ("sasl",)


def honours(offer: Offer, key: str, word: str) -> bool:
    """Does a destination that answered ``offer`` honour ``word`` of list ``key``?"""
    wanted = word.upper()
    if key == "sasl":
        wanted = REPLAYED_AS.get(wanted, wanted)
    return wanted in offer.get(key, frozenset())


def managed(protocol: str, word: str) -> bool:
    """Words stalroute answers itself whatever the list says (STARTTLS, AUTH …)."""
    upper = word.upper()
    if protocol == "imap":
        return upper.startswith(MANAGED_CAPABILITIES)
    return protocol == "submission" and upper in MANAGED_KEYWORDS


def serving(config: Config, protocol: str) -> list[DestinationConfig]:
    """The destinations a login on ``protocol`` may land on (any account maps anywhere)."""
    return [d for _name, d in sorted(config.destinations.items()) if protocol in d.protocols]


def effective(config: Config, protocol: str,
              offers: Mapping[tuple[str, str], Offer]) -> Advertised:
    """What ``protocol``'s listeners advertise given the destinations' answers so far."""
    section = config.capabilities.for_protocol(protocol)
    answers = [offers.get((d.name, protocol), FALLBACK[protocol])
               for d in serving(config, protocol)] or [FALLBACK[protocol]]
    narrowed = {key: tuple(word for word in getattr(section, key)
                           if all(honours(answer, key, word) for answer in answers))
                for key in learnt_keys(protocol) if key not in section.explicit}
    def common(key: str) -> frozenset[str]:
        return frozenset.intersection(*(answer.get(key, frozenset()) for answer in answers))

    return Advertised(replace(section, **narrowed),
                      tuple(sorted(m.lower() for m in common("notify"))), common("capa"))


def broken_promises(config: Config, destination: str, protocol: str, offer: Offer) -> list[str]:
    """Warnings for the explicit lists of ``protocol`` naming words ``offer`` lacks."""
    section = config.capabilities.for_protocol(protocol)
    warnings = []
    for key in learnt_keys(protocol):
        if key not in section.explicit:
            continue
        missing = [word for word in getattr(section, key)
                   if not managed(protocol, word) and not honours(offer, key, word)]
        if missing:
            warnings.append(f"capabilities.{protocol}.{key}: destination {destination} does not "
                            f"offer {' '.join(missing)}; clients relying on it will fail there")
    return warnings


# --- probing ----------------------------------------------------------------------------------


def probe_targets(config: Config) -> list[tuple[DestinationConfig, str]]:
    """Every (destination, protocol) pair behind a listener that advertises capabilities."""
    protocols = sorted({listener.protocol for listener in config.listeners.values()}
                       & FALLBACK.keys())
    return [(destination, protocol) for protocol in protocols
            for destination in serving(config, protocol)]


def probe_config(config: Config, timeout: float | None = None) -> Config:
    """``config`` as probes use it: no circuit breaker (a probe must neither open a circuit nor
    take the one attempt of a half-open one), and optionally a shorter ``backend_timeout``."""
    server = replace(config.server, host_down_threshold=0)
    if timeout is not None:
        server = replace(server, backend_timeout=timeout, backend_connect_retries=0)
    return replace(config, server=server)


def probe_client(config: Config) -> ClientInfo:
    """The client a probe announces (PROXY header, XCLIENT, ID): stalroute itself, over TLS,
    so a backend answers as it would for a login from a TLS client."""
    return ClientInfo(peer=("127.0.0.1", 0), local=("127.0.0.1", 0),
                      tls=TLSDetails("TLSv1.3", None, None),
                      session_id=f"{config.cluster.node_id}-capability-probe",
                      ttl=config.server.proxy_ttl - 1)


async def probe(connector: BackendConnector, destination: DestinationConfig, protocol: str,
                client: ClientInfo) -> Offer:
    """What ``destination`` offers for ``protocol`` before login; raises BackendUnavailable."""
    dialogue = PROTOCOLS[protocol].dialogue
    leg = await connector.open(
        destination, protocol,
        lambda settings: dialogue(replace(settings, learn_capabilities=True)), client)
    try:
        offered = leg.dialogue.offered
    finally:
        leg.close()
    if offered is None:
        raise BackendUnavailable(f"destination {destination.name}: no capabilities learnt")
    return offered


def _describe(offer: Offer) -> str:
    return "; ".join(f"{key} {' '.join(sorted(words)) or '-'}"
                     for key, words in sorted(offer.items()))


class DestinationCapabilities:
    """The destinations' last answers and what stalroute advertises because of them.

    One instance lives as long as the process: a reload calls :meth:`start` again, which
    re-probes at once and keeps the answers of destinations still configured meanwhile.
    """

    def __init__(self) -> None:
        #: (destination name, protocol) → its last answer.
        self.offers: dict[tuple[str, str], Offer] = {}
        self._failing: set[tuple[str, str]] = set()
        self._loop: LoopingCall | None = None
        self._probes: list[Deferred[None]] = []
        #: Bumped by :meth:`stop`: answers of an earlier round arriving late are dropped.
        self._generation = 0
        self._advertised: dict[str, Advertised] = {}
        self._advertised_for: Config | None = None

    def advertised(self, config: Config, protocol: str) -> Advertised:
        """What ``protocol``'s listeners announce now (computed once per change)."""
        if config is not self._advertised_for:
            self._advertised_for, self._advertised = config, {}
        if protocol not in self._advertised:
            self._advertised[protocol] = effective(config, protocol, self.offers)
        return self._advertised[protocol]

    def start(self, reactor, config: Config) -> None:
        """Probe the destinations of ``config`` now (without waiting for the answers) and every
        :data:`PROBE_INTERVAL`; forget destinations no longer configured."""
        self.stop()
        targets = probe_targets(config)
        wanted = {(destination.name, protocol) for destination, protocol in targets}
        self.offers = {key: offer for key, offer in self.offers.items() if key in wanted}
        self._failing &= wanted
        self._advertised_for = None
        connector = BackendConnector(reactor, probe_config(config))
        self._loop = LoopingCall(self._round, connector, targets, probe_client(config),
                                 self._generation)
        self._loop.clock = reactor
        self._loop.start(PROBE_INTERVAL, now=True).addErrback(
            lambda failure: log.failure("capability probes stopped", failure))

    def stop(self) -> None:
        """Stop probing; probes under way are abandoned."""
        self._generation += 1
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        probes, self._probes = self._probes, []
        for probing in probes:
            probing.cancel()

    def _round(self, connector: BackendConnector, targets: Iterable[tuple[DestinationConfig, str]],
               client: ClientInfo, generation: int) -> Deferred[object]:
        self._probes = [
            Deferred.fromCoroutine(probe(connector, destination, protocol, client))
            .addBoth(self._record, destination.name, protocol, generation)
            for destination, protocol in targets]
        return DeferredList(self._probes)

    def _record(self, result: Offer | Failure, destination: str, protocol: str,
                generation: int) -> None:
        if generation != self._generation:
            return
        key = (destination, protocol)
        if isinstance(result, Failure):
            if not result.check(BackendUnavailable):
                log.failure("capability probe of destination {destination} ({protocol})",
                            result, destination=destination, protocol=protocol)
            elif key not in self._failing:
                log.warn("capability probe of destination {destination} ({protocol}) failed: "
                         "{reason}; {keeping}", destination=destination, protocol=protocol,
                         reason=result.getErrorMessage(),
                         keeping="keeping its last answer" if key in self.offers
                         else "assuming what every known backend offers")
            self._failing.add(key)
            return
        self._failing.discard(key)
        if self.offers.get(key) != result:
            self.offers[key] = result
            self._advertised_for = None
            log.info("destination {destination} offers before login ({protocol}): {offer}",
                     destination=destination, protocol=protocol, offer=_describe(result))


def explicit_targets(config: Config) -> list[tuple[DestinationConfig, str]]:
    """The probe targets whose protocol has an explicit list (what ``check`` verifies)."""
    return [(destination, protocol) for destination, protocol in probe_targets(config)
            if set(learnt_keys(protocol)) & config.capabilities.for_protocol(protocol).explicit]


async def check_promises(reactor, config: Config, timeout: float) -> list[str]:
    """``stalroute check``: probe the destinations behind explicit lists (bounded by
    ``timeout``) and warn where a list promises more than one offers, or one cannot be asked."""
    targets = explicit_targets(config)
    if not targets:
        return []
    connector = BackendConnector(reactor, probe_config(config, timeout))
    client = probe_client(config)
    results = await DeferredList(
        [Deferred.fromCoroutine(probe(connector, destination, protocol, client))
         for destination, protocol in targets], consumeErrors=True)
    warnings = []
    for (destination, protocol), (answered, result) in zip(targets, results):
        if answered:
            warnings += broken_promises(config, destination.name, protocol, result)
        else:
            warnings.append(f"destination.{destination.name}.protocol.{protocol}: capabilities "
                            f"not verified ({result.getErrorMessage()})")
    return warnings
