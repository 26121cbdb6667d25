"""The ``stalroute`` command line: ``stalroute check CONFIG`` and ``stalroute ctl`` (ctl/).

``check`` loads the file through :func:`stalroute.config.load_config` and prepares the
runtime with :func:`stalroute.runtime.build_runtime` (mapping table, TLS material), the same
calls the twistd plugin makes at startup, so "check passes" and "startup accepts it" cannot
drift apart. A network mapping store (SQL, Redis) is then asked one bounded lookup, and
destinations behind an explicit capability list are asked what they offer: an unreachable
store or destination, or a list promising more than a destination offers, is a warning, not
an error, since stalroute starts without them.
``check --skip-files`` validates a configuration written for another host: nothing the
file names is read or stat'ed (certificates, keys, CA files, the token file, the mapping
file), so the runtime is not built and nothing is asked over the network; every other check
still runs.
Output is meant for people and scripts alike: on success one ``OK:`` line on stdout, on
failure one ``key: message`` line per problem on stdout and exit status 1.  Warnings go to
stderr so they never disturb either form.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import cast

from twisted.internet import defer, error

from stalroute.capabilities import check_promises, explicit_targets
from stalroute.config import (
    Config,
    ConfigError,
    RedisMappingConfig,
    config_path_from_env,
    load_config,
)
from stalroute.ctl import add_ctl_parser
from stalroute.mapping import InvalidStoreSetting
from stalroute.mapping.redis_url import parse_redis_url
from stalroute.runtime import Runtime, StartupError, build_runtime
from stalroute.transport import IConnectingReactor

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
#: Bound of each question ``check`` asks over the network (mapping store, destinations).
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
    check.add_argument(
        "--skip-files",
        action="store_true",
        help="for a configuration written for another host: do not read or look for the files "
        "it names (certificates, keys, CA files, token file, mapping file)",
    )
    check.set_defaults(handler=_check)
    add_ctl_parser(commands)
    return parser


def _check(args: argparse.Namespace) -> int:
    path = args.config or config_path_from_env(os.environ)
    if not path:
        print("stalroute check: no CONFIG given and $STALROUTE_CONFIG is not set", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(path, os.environ, check_files=not args.skip_files)
    except ConfigError as exc:
        for config_problem in exc.problems:
            print(config_problem)
        return EXIT_INVALID
    listeners, destinations = len(config.listeners), len(config.destinations)
    if args.skip_files:
        if url_problem := store_url_problem(config):
            print(url_problem)
            return EXIT_INVALID
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"OK: {path} ({listeners} listeners, {destinations} destinations; "
              "files not checked)")
        return EXIT_OK
    problem, runtime = prepare_runtime(config)
    if problem or runtime is None:
        print(problem)
        return EXIT_INVALID
    for note in [*map(str, config.warnings), *network_warnings(config, runtime)]:
        print(f"warning: {note}", file=sys.stderr)
    print(f"OK: {path} ({listeners} listeners, {destinations} destinations)")
    return EXIT_OK


def prepare_runtime(config: Config) -> tuple[str | None, Runtime | None]:
    """Build the runtime as startup does: ``(problem, None)`` or ``(None, runtime)``."""
    from twisted.internet import reactor  # installs the default reactor: only when used

    try:
        return None, build_runtime(cast(IConnectingReactor, reactor), config)
    except StartupError as exc:
        return str(exc), None


def store_url_problem(config: Config) -> str | None:
    """What startup refuses in a Redis store's URL (its parameters), without building the
    store, which would read the ``ssl_ca_certs`` file (``--skip-files``)."""
    settings = config.mapping.settings
    if not isinstance(settings, RedisMappingConfig):
        return None
    try:
        parse_redis_url(settings.url)
    except InvalidStoreSetting as exc:
        return str(exc)
    return None


def network_warnings(config: Config, runtime: Runtime,
                     timeout: float = PROBE_TIMEOUT) -> list[str]:
    """What ``check`` learns by asking, each question bounded by ``timeout``: whether a network
    mapping store answers one lookup, and whether an explicit capability list promises more
    than a destination offers (:func:`stalroute.capabilities.check_promises`).

    Neither is a configuration error (stalroute starts without them), so both only warn.
    Runs the reactor once (only when there is something to ask), so it can be used once per
    process.
    """
    from twisted.internet import reactor  # installs the default reactor: only when used

    ask_store = config.mapping.source != "file"
    if not ask_store and not explicit_targets(config):
        return []
    warnings: list[str] = []

    async def store_warnings() -> list[str]:
        store = runtime.router.store
        lookup = defer.maybeDeferred(store.lookup, PROBE_IDENTIFIER)
        lookup.addTimeout(timeout, reactor)
        try:
            await lookup
            return []
        except (defer.TimeoutError, error.TimeoutError):
            reason = f"no answer within {timeout:g}s"
        except Exception as exc:  # noqa: BLE001 - any failure means "unreachable"
            reason = str(exc) or type(exc).__name__
        finally:
            await defer.maybeDeferred(store.close)
        return [f"mapping store unreachable: {reason}"]

    async def ask() -> None:
        try:
            if ask_store:
                warnings.extend(await store_warnings())
            warnings.extend(await check_promises(cast(IConnectingReactor, reactor), config,
                                                 timeout))
        finally:
            reactor.stop()

    if reactor.running:  # pragma: no cover - check is a command, not a library call
        return []
    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(ask()))
    try:
        # IReactorCore.run does not declare the keyword every real reactor takes.
        reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    except error.ReactorNotRestartable:
        return ["network not asked (the reactor already ran in this process)"]
    return warnings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stalroute`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
