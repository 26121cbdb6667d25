"""``stalroute ctl``: the command-line client of the admin API (SPEC §1, §8).

``client`` talks to the API (settings, HTTPS, errors, bulk import/export); ``commands``
parses the subcommands from a table and prints their answers; this module is the entry
point :mod:`stalroute.cli` registers.

Where things come from, first match wins:

* URL: ``--url``, ``$STALROUTE_ADMIN_URL``, ``[admin] bind`` of ``--config`` (or of
  ``$STALROUTE_CONFIG``; a wildcard address becomes loopback), ``https://127.0.0.1:8443``.
* Token: ``--token-file``, ``$STALROUTE_ADMIN_TOKEN`` (or ``$PROXY_ADMIN_TOKEN``), then the
  config's ``bearer_token_file`` / ``bearer_token``.
* Trust: the system store, or ``--cacert FILE``; ``--insecure`` skips verification.

Output is a readable table or sentence; ``--json`` prints the API's JSON instead.  Exit
status: 0 success, 1 the API answered an error (or could not be reached, or a bulk import
rejected rows, or ``health`` is not ready, or ``mappings get`` found no mapping, or
``certificates renew --wait`` saw the order fail or time out), 2 usage.
"""

from __future__ import annotations

import argparse
import sys

from stalroute.ctl.client import (
    EXIT_API,
    EXIT_OK,
    EXIT_USAGE,
    Client,
    CtlError,
    resolve_token,
    resolve_url,
    tls_context,
)
from stalroute.ctl.commands import Action, add_connection_options, add_subcommands


def add_ctl_parser(
        subparsers: argparse._SubParsersAction[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """Register ``ctl`` and its subcommands on the ``stalroute`` subparsers object."""
    ctl = subparsers.add_parser(
        "ctl", help="command-line client for the admin API",
        description="Talk to a running stalroute's admin API (HTTPS).",
        epilog="Exit status: 0 ok, 1 API error (or rows rejected, not ready, not mapped, "
               "renewal failed), 2 usage.")
    add_connection_options(ctl, suppress=False)
    ctl.set_defaults(handler=run_ctl, ctl_action=None)
    add_subcommands(ctl)
    ctl.set_defaults(ctl_help=ctl)
    return ctl


def run_ctl(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; its exit status (help and 2 when none was given)."""
    action: Action | None = getattr(args, "ctl_action", None)
    if action is None:
        args.ctl_help.print_help(sys.stderr)
        return EXIT_USAGE
    client = None
    try:
        client = Client(resolve_url(args), resolve_token(args), tls_context(args), args.timeout)
        return action(client, args)
    except CtlError as exc:
        print(f"stalroute ctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("stalroute ctl: interrupted", file=sys.stderr)
        return EXIT_API
    except BrokenPipeError:  # `ctl mappings export | head`
        return EXIT_OK
    finally:
        if client is not None:
            client.close()
