"""What the destinations honour before login, and so what stalroute advertises (SPEC §2.4 [ext]).

A client reads stalroute's pre-auth capabilities and relies on them after login, when it
talks to whichever backend its account lives on.  So where the operator did not set
``advertise``, ``ehlo``, ``sieve`` or ``sasl`` explicitly, stalroute advertises a configured
word only when every destination serving the protocol offers it.  What a destination offers
is learnt by a probe: a backend leg opened exactly as for a login (PROXY header, TLS or
STARTTLS, forwarding), whose dialogue records the capabilities it read, closed without
logging in.  Destinations are probed at start, after each reload and every
:data:`PROBE_INTERVAL`; one that does not answer keeps its last answer, and one that never
answered counts as offering its protocol's fallback (what every known-good backend offers).
``stalroute check`` uses the same probe to warn where an explicit list promises more.

What differs between protocols (which lists are learnt, the fallback, the words stalroute
computes itself, the machine's own settings) is each protocol's
:class:`~stalroute.protocols.base.CapabilityRules`, found through its registry entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from stalroute.backend import BackendConnector, BackendUnavailable, ClientInfo
from stalroute.config import Config, DestinationConfig, ListenerConfig, ProtocolCapabilities
from stalroute.logs import logger
from stalroute.protocols import PROTOCOLS
from stalroute.protocols.base import C, CapabilityRules, Offer, PreAuthSettings
from stalroute.tls import TLSDetails
from stalroute.transport import IConnectingReactor

log = logger("stalroute.capabilities")

#: Seconds between two probes of every destination.
PROBE_INTERVAL = 300.0

#: The protocols that announce capabilities of their own, and how.
RULES: dict[str, CapabilityRules[Any]] = {
    name: spec.capabilities for name, spec in PROTOCOLS.items() if spec.capabilities is not None}

#: A client mechanism is honoured when the backend offers the one its login is replayed as
#: (SPEC §3 step 7: SASL LOGIN becomes PLAIN).
REPLAYED_AS = {"LOGIN": "PLAIN"}


# --- what to advertise (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class Advertised(Generic[C]):
    """What the listeners of one protocol announce before login."""

    #: ``[capabilities.<proto>]`` with the lists the operator left unset narrowed down.
    section: ProtocolCapabilities
    #: The protocol's own settings, from that section and what every destination offers.
    settings: C


def honours(offer: Offer, key: str, word: str) -> bool:
    """Does a destination that answered ``offer`` honour ``word`` of list ``key``?"""
    wanted = word.upper()
    if key == "sasl":
        wanted = REPLAYED_AS.get(wanted, wanted)
    return wanted in offer.get(key, frozenset())


def serving(config: Config, protocol: str) -> list[DestinationConfig]:
    """The destinations a login on ``protocol`` may land on (any account maps anywhere)."""
    return [d for _name, d in sorted(config.destinations.items()) if protocol in d.protocols]


def effective(config: Config, protocol: str,
              offers: Mapping[tuple[str, str], Offer]) -> Advertised[Any]:
    """What ``protocol``'s listeners advertise given the destinations' answers so far."""
    rules = RULES[protocol]
    section = config.capabilities.for_protocol(protocol)
    answers = [offers.get((d.name, protocol), rules.fallback)
               for d in serving(config, protocol)] or [rules.fallback]
    # Any: the lists are tuple[str, ...] fields, which replace() cannot be told by name.
    narrowed: dict[str, Any] = {
        key: tuple(word for word in getattr(section, key)
                   if all(honours(answer, key, word) for answer in answers))
        for key in rules.learnt if key not in section.explicit}
    section = replace(section, **narrowed)
    common = {key: frozenset.intersection(*(answer.get(key, frozenset()) for answer in answers))
              for key in set().union(*answers)}
    return Advertised(section, rules.settings(section, common))


def broken_promises(config: Config, destination: str, protocol: str, offer: Offer) -> list[str]:
    """Warnings for the explicit lists of ``protocol`` naming words ``offer`` lacks."""
    rules = RULES[protocol]
    section = config.capabilities.for_protocol(protocol)
    warnings = []
    for key in rules.learnt:
        if key not in section.explicit:
            continue
        missing = [word for word in getattr(section, key)
                   if not rules.managed(word) and not honours(offer, key, word)]
        if missing:
            warnings.append(f"capabilities.{protocol}.{key}: destination {destination} does not "
                            f"offer {' '.join(missing)}; clients relying on it will fail there")
    return warnings


# --- probing ----------------------------------------------------------------------------------


def probe_targets(config: Config) -> list[tuple[DestinationConfig, str]]:
    """Every (destination, protocol) pair behind a listener that advertises capabilities."""
    protocols = sorted({listener.protocol for listener in config.listeners.values()}
                       & RULES.keys())
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
        self._advertised: dict[str, Advertised[Any]] = {}
        self._advertised_for: Config | None = None

    def advertised(self, config: Config, protocol: str) -> Advertised[Any]:
        """What ``protocol``'s listeners announce now (computed once per change)."""
        if config is not self._advertised_for:
            self._advertised_for, self._advertised = config, {}
        if protocol not in self._advertised:
            self._advertised[protocol] = effective(config, protocol, self.offers)
        return self._advertised[protocol]

    def preauth_settings(self, config: Config, listener: ListenerConfig) -> PreAuthSettings[Any]:
        """What ``listener``'s pre-auth machine announces: the configured capabilities,
        narrowed to what the destinations honour where the operator left a list unset."""
        if listener.protocol not in RULES:  # SMTP/LMTP pass-through: nothing to announce
            return PreAuthSettings(
                hostname=config.server.hostname, tls_mode=listener.tls, sasl=(),
                allow_plain_auth_without_tls=False, banner="", capabilities=None,
                max_auth_attempts=listener.max_auth_attempts)
        advertised = self.advertised(config, listener.protocol)
        section = advertised.section
        return PreAuthSettings(
            hostname=config.server.hostname, tls_mode=listener.tls, sasl=tuple(section.sasl),
            allow_plain_auth_without_tls=section.allow_plain_auth_without_tls,
            banner=section.banner, capabilities=advertised.settings,
            max_auth_attempts=listener.max_auth_attempts)

    def start(self, reactor: IConnectingReactor, config: Config) -> None:
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
               client: ClientInfo, generation: int) -> Deferred[list[tuple[bool, None]]]:
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
            if set(RULES[protocol].learnt) & config.capabilities.for_protocol(protocol).explicit]


async def check_promises(reactor: IConnectingReactor, config: Config,
                         timeout: float) -> list[str]:
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
    for (destination, protocol), (_answered, result) in zip(targets, results):
        if isinstance(result, Failure):  # consumed: the probe's error, not its answer
            warnings.append(f"destination.{destination.name}.protocol.{protocol}: capabilities "
                            f"not verified ({result.getErrorMessage()})")
        else:
            warnings += broken_promises(config, destination.name, protocol, result)
    return warnings
