"""The ``stalroute`` command line: ``stalroute check CONFIG`` (and, later, ``stalroute ctl``).

``check`` loads the file through :func:`stalroute.config.load_config` and prepares the
runtime with :func:`stalroute.service.build_runtime` (mapping table, TLS material), the same
calls the twistd plugin makes at startup, so "check passes" and "startup accepts it" cannot
drift apart.
Output is meant for people and scripts alike: on success one ``OK:`` line on stdout, on
failure one ``key: message`` line per problem on stdout and exit status 1.  Warnings go to
stderr so they never disturb either form.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from stalroute.config import ConfigError, config_path_from_env, load_config

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


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
    problem = startup_problem(config)
    if problem:
        print(problem)
        return EXIT_INVALID
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    listeners, destinations = len(config.listeners), len(config.destinations)
    print(f"OK: {path} ({listeners} listeners, {destinations} destinations)")
    return EXIT_OK


def startup_problem(config) -> str | None:
    """What would stop startup after validation (a bad mapping file, unreadable TLS material)."""
    from twisted.internet import reactor

    from stalroute.service import StartupError, build_runtime
    from stalroute.session import SessionRegistry

    try:
        build_runtime(reactor, config, SessionRegistry())
    except StartupError as exc:
        return str(exc)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stalroute`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
