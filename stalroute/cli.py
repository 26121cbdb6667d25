"""The ``stalroute`` command line: ``stalroute check CONFIG`` (and, later, ``stalroute ctl``).

``check`` loads the file through :func:`stalroute.config.load_config` and prepares the
runtime with :func:`stalroute.service.build_runtime` (mapping table, TLS material), the same
calls the twistd plugin makes at startup, so "check passes" and "startup accepts it" cannot
drift apart. A network mapping store (SQL, Redis) is then asked one bounded lookup: an
unreachable store is a warning, not an error, since stalroute starts without it.
Output is meant for people and scripts alike: on success one ``OK:`` line on stdout, on
failure one ``key: message`` line per problem on stdout and exit status 1.  Warnings go to
stderr so they never disturb either form.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from stalroute.config import ConfigError, config_path_from_env, load_config

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from stalroute.config import Config
    from stalroute.mapping import MappingStore
    from stalroute.session import Runtime

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
#: Bound of the ``check`` probe of a network mapping store.
PROBE_TIMEOUT = 3.0
#: What the probe looks up: only whether the store answers matters, not the answer.
PROBE_IDENTIFIER = "stalroute-check-probe"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stalroute",
        description="stalroute: multi-protocol e-mail routing proxy (run: twistd stalroute).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    check = commands.add_parser(
        "check",
        help="validate a configuration file exactly as startup does",
        description="Validate CONFIG: exit 0 if it would start, else print every problem, exit 1.",
    )
    check.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG",
        help="path of the TOML file (default: $STALROUTE_CONFIG, or $PROXY_CONFIG)",
    )
    check.set_defaults(handler=_check)

    from stalroute.ctl import add_ctl_parser

    add_ctl_parser(commands)
    return parser


def _check(args: argparse.Namespace) -> int:
    path = args.config or config_path_from_env(os.environ)
    if not path:
        print("stalroute check: no CONFIG given and $STALROUTE_CONFIG is not set", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(path, os.environ)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return EXIT_INVALID
    problem, runtime = prepare_runtime(config)
    if problem or runtime is None:
        print(problem)
        return EXIT_INVALID
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if config.mapping.source != "file":
        if warning := store_warning(runtime.router.store):
            print(f"warning: {warning}", file=sys.stderr)
    listeners, destinations = len(config.listeners), len(config.destinations)
    print(f"OK: {path} ({listeners} listeners, {destinations} destinations)")
    return EXIT_OK


def prepare_runtime(config: Config) -> tuple[str | None, Runtime | None]:
    """Build the runtime as startup does: ``(problem, None)`` or ``(None, runtime)``."""
    from twisted.internet import reactor

    from stalroute.service import StartupError, build_runtime

    try:
        return None, build_runtime(reactor, config)
    except StartupError as exc:
        return str(exc), None


def store_warning(store: MappingStore, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Ask the mapping store one lookup, bounded by ``timeout``; a warning when it fails.

    A store that is down is not a configuration error (stalroute starts and tempfails
    lookups until it is back), so ``check`` only warns. Runs the reactor once, so it can be
    used once per process.
    """
    from twisted.internet import defer, error, reactor

    outcome: list[str | None] = []

    def failed(failure: Failure) -> str:
        if failure.check(defer.TimeoutError, error.TimeoutError):
            return f"no answer within {timeout:g}s"
        return failure.getErrorMessage() or failure.type.__name__

    def probe() -> None:
        d = defer.maybeDeferred(store.lookup, PROBE_IDENTIFIER)
        d.addTimeout(timeout, reactor)
        d.addCallbacks(lambda _: None, failed)
        d.addCallback(outcome.append)
        d.addBoth(lambda _: store.close())
        d.addBoth(lambda _: reactor.stop())

    if reactor.running:  # pragma: no cover - check is a command, not a library call
        return None
    reactor.callWhenRunning(probe)
    try:
        reactor.run(installSignalHandlers=False)
    except error.ReactorNotRestartable:
        return "mapping store not probed (the reactor already ran in this process)"
    if outcome and outcome[0]:
        return f"mapping store unreachable: {outcome[0]}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stalroute`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
