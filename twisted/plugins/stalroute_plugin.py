"""``twistd stalroute``: run the proxy (SPEC §1). No ``__init__.py`` belongs in this folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import cast

from twisted.application.service import IService, IServiceMaker, MultiService
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

    def makeService(self, options: Options) -> IService:
        """The admin API's service (with ``[admin]``) and the proxy service, in one MultiService,
        wrapped for JSON logs when ``server.log_format = "json"``. Started in that order, so
        "stalroute started" is the last line of a good start; stopped at once (the admin port
        closes as the proxy's drain begins)."""
        # Imported here, not at the top, so that `twistd --help` stays fast and works without
        # a config (twistd imports every plugin module to list it). Not to dodge a cycle.
        from twisted.internet import reactor

        from stalroute.admin.server import AdminService, IAdminReactor
        from stalroute.config import ConfigError, load_config
        from stalroute.logs import service_for_twistd
        from stalroute.runtime import StartupError
        from stalroute.service import ProxyService
        from stalroute.supervisor import ISupervisorReactor, SupervisorService, worker_count
        from stalroute.transport import IServingReactor

        try:
            config = load_config(options["config"], env=os.environ)
            # Every real reactor provides what each service says it needs.
            proxy = (SupervisorService(cast(ISupervisorReactor, reactor), config)
                     if worker_count(config) > 1
                     else ProxyService(cast(IServingReactor, reactor), config))
            services = MultiService()
            if config.admin:
                AdminService(cast(IAdminReactor, reactor), proxy.control,
                             config.admin).setServiceParent(services)
            proxy.setServiceParent(services)
            return service_for_twistd(services, config.server.log_format, options.parent or {})
        except ConfigError as exc:
            for problem in exc.problems:
                # A problem of the file itself (unreadable, not TOML) is located by its path
                # already: named once, as `stalroute check` does.
                located = problem.key == str(Path(options["config"]))
                print(problem if located else f"{options['config']}: {problem}",
                      file=sys.stderr)
        except (StartupError, OSError) as exc:
            print(f"{options['config']}: {exc}", file=sys.stderr)
        raise SystemExit(1)


serviceMaker = StalrouteServiceMaker()
