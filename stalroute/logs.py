"""Logging: twisted.logger with one level setting for every stalroute logger, and the
``server.log_format = "json"`` output (SPEC §2.1, §10)."""

from __future__ import annotations

import json
import math
import signal
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import IO, Any, cast

from twisted.application.service import IService, MultiService
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import (
    FileLogObserver, FilteringLogObserver, ILogObserver, LogEvent, LogLevel,
    LogLevelFilterPredicate, Logger, formatEvent, globalLogPublisher,
)
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile
from twisted.python.reflect import safe_str

_LEVELS = {"trace": LogLevel.debug, "debug": LogLevel.debug, "info": LogLevel.info,
           "warn": LogLevel.warn, "warning": LogLevel.warn, "error": LogLevel.error}
_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])

#: Keyword arguments of stalroute's log calls that JSON lines carry as fields of their own
#: (session context and the end-of-session figures). ``account`` is whatever the call passed,
#: which is already the redacted label (:func:`stalroute.identity.redact`) the text line shows.
CONTEXT_FIELDS = ("session", "listener", "protocol", "client", "account", "destination",
                  "outcome", "status", "bytes_in", "bytes_out", "duration", "worker")


def set_level(name: str) -> None:
    """Apply ``server.log_level`` (or ``STALROUTE_LOG_LEVEL``) to every stalroute logger."""
    _predicate.defaultLogLevel = _LEVELS[name.lower()]
    _predicate.clearLogLevels()


def enabled(level: LogLevel, namespace: str) -> bool:
    """Whether an event of ``level`` from ``namespace`` is written: a hot path skips building
    the fields of one that is not."""
    return level >= _predicate.logLevelForNamespace(namespace)


def logger(namespace: str) -> Logger:
    """A logger whose events obey :func:`set_level`."""
    return Logger(namespace=namespace, observer=_observer)


# --- JSON lines ------------------------------------------------------------------------------


def _field_value(value: Any) -> str | int | float | bool | None:
    """A JSON scalar: numbers, booleans and None as they are, anything else as its text, so an
    object logged by mistake shows as its ``str()`` and never as its attributes."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return safe_str(value)


def event_as_json(event: LogEvent) -> str:
    """One log event as one line of flat JSON (ASCII, newline-terminated), for log shippers.

    Always ``time`` (RFC 3339, UTC), ``level``, ``namespace`` and ``event`` (the message as the
    text log formats it); ``system`` and ``traceback`` when the event has them; and, for
    stalroute's own events, the :data:`CONTEXT_FIELDS` its call passed. Nothing else of the
    event is written, so arbitrary objects (and a failure's frame locals) never are.
    """
    when = datetime.fromtimestamp(event.get("log_time", 0.0), timezone.utc)
    namespace = event.get("log_namespace") or "-"
    line: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": event.get("log_level", LogLevel.info).name,
        "namespace": namespace,
        "event": formatEvent(event),
    }
    if event.get("log_system") not in (None, "-"):
        line["system"] = safe_str(event["log_system"])
    if namespace == "stalroute" or namespace.startswith("stalroute."):
        line.update((key, _field_value(event[key])) for key in CONTEXT_FIELDS if key in event)
    if (failure := event.get("log_failure")) is not None:
        line["traceback"] = safe_str(failure.getTraceback())  # default detail: no locals
    return json.dumps(line, ensure_ascii=True, separators=(",", ":")) + "\n"


def json_file_observer(out_file: IO[Any]) -> FileLogObserver:
    """Writes every event to ``out_file`` as a line of :func:`event_as_json`."""
    return FileLogObserver(out_file, event_as_json)


# --- twistd ----------------------------------------------------------------------------------


def twistd_log_file(twistd_options: Mapping[str, Any]) -> IO[Any] | None:
    """The file twistd itself would log to for these options (``-n``, ``--logfile``), opened
    as twistd opens it (a :class:`LogFile` rotated by size and on SIGUSR1); ``None`` where twistd
    logs elsewhere (``--syslog``, ``--logger``) or refuses the options (``--logfile=-`` when
    daemonising), which then stand as they are.

    Mirrors ``twisted.scripts._twistd_unix.UnixAppLogger._getLogObserver``.
    """
    if twistd_options.get("syslog") or twistd_options.get("logger"):
        return None
    name, nodaemon = twistd_options.get("logfile"), twistd_options.get("nodaemon")
    if name == "-" or (nodaemon and not name):
        return sys.stdout if nodaemon else None
    log_file = LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor  # the one twistd installed by now

            cast(IReactorFromThreads, reactor).callFromThread(log_file.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return log_file


class LoggingApplicationService(MultiService):
    """Runs ``service`` and makes twistd log through ``observer``.

    twistd builds its Application around what the plugin's ``makeService`` returns, then starts
    logging with the application's :class:`ILogObserver` component if there is one
    (``twisted.application.app.AppLogger.start``): being parented to that application is the
    one moment a plugin can set it.
    """

    def __init__(self, service: IService, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def service_for_twistd(service: IService, log_format: str,
                       twistd_options: Mapping[str, Any]) -> IService:
    """What the twistd plugin returns: ``service`` itself for text logs (twistd's own observer),
    else ``service`` wrapped so that twistd writes JSON lines to its usual log file."""
    out_file = twistd_log_file(twistd_options) if log_format == "json" else None
    if out_file is None:
        return service
    return LoggingApplicationService(service, json_file_observer(out_file))
