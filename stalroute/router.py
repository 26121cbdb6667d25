"""Account identifier → destination: cache, then store, then the default (SPEC §3 step 5)."""

from __future__ import annotations

import time

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from stalroute.config import Config, DestinationConfig
from stalroute.identity import redact
from stalroute.limits import LoginDelays
from stalroute.logs import logger
from stalroute.mapping import MappingStore, StoreError
from stalroute.mapping.cache import RoutingCache
from stalroute.stats import Metrics

log = logger("stalroute.router")


class RoutingUnavailable(Exception):
    """The store failed and ``on_store_error = "tempfail"``: the client should retry later."""


class Router:
    """Resolves identifiers against one store through one cache."""

    def __init__(self, config: Config, store: MappingStore, cache: RoutingCache,
                 metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.cache = cache
        self._metrics = metrics

    @property
    def default(self) -> DestinationConfig:
        return self.config.destinations[self.config.routing.default_destination]

    def resolve(self, identifier: str | None) -> Deferred[DestinationConfig]:
        """The destination for ``identifier`` (already stripped and normalized).

        No identifier (a token we cannot read) means the default destination.
        """
        if identifier is None:
            return succeed(self.default)
        return self.cache.resolve(identifier, self._timed_lookup).addCallbacks(
            self._named, self._store_failed, callbackArgs=(identifier,),
            errbackArgs=(identifier,))

    def known(self, identifier: str | None) -> DestinationConfig | None:
        """The destination for ``identifier`` when it is known without waiting (no
        identifier, or a fresh cache entry); None when :meth:`resolve` must ask the store."""
        if identifier is None:
            return self.default
        known = self.cache.known(identifier)
        return None if known is None else self._named(known[0], identifier)

    def _timed_lookup(self, identifier: str) -> Deferred[str | None]:
        started = time.monotonic()

        def observe(result: object) -> object:
            self._metrics.store_latency.observe(time.monotonic() - started)
            return result

        return self.store.lookup(identifier).addBoth(observe)

    def _named(self, name: str | None, identifier: str) -> DestinationConfig:
        if name is None:
            return self.default
        destination = self.config.destinations.get(name)
        if destination is None:
            log.warn("mapping for {identifier} names undeclared destination {name!r}; "
                     "using the default", identifier=redact(identifier), name=name)
            return self.default
        return destination

    def _store_failed(self, failure: Failure, identifier: str) -> DestinationConfig:
        failure.trap(StoreError)
        if self.config.routing.on_store_error == "default":
            log.warn("store error for {identifier} ({error}); routing to the default",
                     identifier=redact(identifier), error=failure.getErrorMessage())
            return self.default
        raise RoutingUnavailable(failure.getErrorMessage())


def known_login(router: Router, delays: LoginDelays,
                identifier: str | None) -> DestinationConfig | None:
    """What :func:`resolve_login` would answer, when it would answer at once (no login delay,
    a cache hit); None otherwise."""
    if identifier and delays.remaining(identifier):
        return None
    return router.known(identifier)


async def resolve_login(router: Router, delays: LoginDelays, clock: IReactorTime,
                        identifier: str | None, session_id: str) -> DestinationConfig:
    """The one routing step of every login and HTTP request: honour a login delay set by an
    operator (``POST /connections/delay``), then resolve. Cancelling it cancels the wait."""
    if identifier and (held := delays.remaining(identifier)):
        log.info("session {session}: holding the login of {account} for {held:.1f}s",
                 session=session_id, account=redact(identifier), held=held)
        await deferLater(clock, held)
    return await router.resolve(identifier)
