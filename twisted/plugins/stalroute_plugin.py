"""``twistd stalroute``: run the proxy (SPEC §1). No ``__init__.py`` belongs in this folder."""

from __future__ import annotations

import os
import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [
        ["config", "c", None,
         "Path to stalroute.toml (default: $STALROUTE_CONFIG, or $PROXY_CONFIG)."],
    ]

    def postOptions(self) -> None:
        self["config"] = (self["config"] or os.environ.get("STALROUTE_CONFIG")
                          or os.environ.get("PROXY_CONFIG"))
        if not self["config"]:
            raise usage.UsageError("--config is required (or set STALROUTE_CONFIG)")


@implementer(IServiceMaker, IPlugin)
class StalrouteServiceMaker:
    tapname = "stalroute"
    description = "Multi-protocol e-mail routing proxy (IMAP, POP3, ManageSieve, SMTP, HTTP)."
    options = Options

    def makeService(self, options: Options):
        # Imported here so that `twistd --help` stays fast and works without a config.
        from twisted.internet import reactor

        from stalroute.config import ConfigError, load_config
        from stalroute.logs import service_for_twistd
        from stalroute.service import StalrouteService, StartupError

        try:
            config = load_config(options["config"], env=os.environ)
            return service_for_twistd(StalrouteService(reactor, config),
                                      config.server.log_format, options.parent)
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"{options['config']}: {problem}", file=sys.stderr)
        except (StartupError, OSError) as exc:
            print(f"{options['config']}: {exc}", file=sys.stderr)
        raise SystemExit(1)


serviceMaker = StalrouteServiceMaker()
