"""Logging: twisted.logger with one level setting for every stalroute logger (SPEC §10)."""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate, Logger, globalLogPublisher,
)

_LEVELS = {"trace": LogLevel.debug, "debug": LogLevel.debug, "info": LogLevel.info,
           "warn": LogLevel.warn, "warning": LogLevel.warn, "error": LogLevel.error}
_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def set_level(name: str) -> None:
    """Apply ``server.log_level`` (or ``STALROUTE_LOG_LEVEL``) to every stalroute logger."""
    _predicate.defaultLogLevel = _LEVELS[name.lower()]
    _predicate.clearLogLevels()


def logger(namespace: str) -> Logger:
    """A logger whose events obey :func:`set_level`."""
    return Logger(namespace=namespace, observer=_observer)
