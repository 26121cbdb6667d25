"""Entry points: a TOML file (or parsed document) in, a validated :class:`Config` out.

:func:`parse_config` builds every section, then runs the cross-section checks, and refuses
with one :class:`~stalroute.config.reader.ConfigError` listing *every* problem with its key
path, so an operator fixes a file in one pass.  Relative paths in the file are resolved
against the directory of the configuration file; see ``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stalroute.config.checks import check_references
from stalroute.config.reader import (
    ConfigError,
    Context,
    Problem,
    check_unknown,
    named_tables,
    read_table,
)
from stalroute.config.schema import (
    ENV_CONFIG,
    Config,
    OAuthConfig,
    RoutingConfig,
    SecurityConfig,
)
from stalroute.config.sections import (
    acme_subjects,
    build_acme,
    build_admin,
    build_capabilities,
    build_cluster,
    build_destination,
    build_http,
    build_listener,
    build_server,
    build_tls,
)
from stalroute.config.stores import build_mapping

_TOP_LEVEL = (
    "server",
    "tls",
    "listener",
    "capabilities",
    "oauth",
    "destination",
    "routing",
    "mapping",
    "http",
    "admin",
    "cluster",
    "security",
    "acme",
)


def parse_config(
    document: dict[str, Any],
    base_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    check_files: bool = True,
    source_path: Path | None = None,
) -> Config:
    """Validate a parsed TOML document; raise :class:`ConfigError` listing every problem.

    ``base_dir`` anchors relative paths.  ``check_files=False`` skips everything that reads
    the file system (existence, certificate parsing, the admin token file), for validating
    a configuration written for another machine.
    """
    ctx = Context(Path(base_dir), os.environ if env is None else env, check_files)
    check_unknown(ctx, document, "", _TOP_LEVEL)

    server = build_server(ctx, document.get("server", {}))
    tls = build_tls(ctx, document.get("tls", {}))
    listener_tables = named_tables(ctx, document.get("listener", {}), "listener")
    listeners = {name: build_listener(ctx, name, t) for name, t in listener_tables.items()}
    capabilities = build_capabilities(ctx, document.get("capabilities", {}))
    oauth = OAuthConfig(**read_table(ctx, document.get("oauth", {}), "oauth", OAuthConfig))
    destination_tables = named_tables(ctx, document.get("destination", {}), "destination")
    destinations = {
        name: build_destination(ctx, name, t) for name, t in destination_tables.items()
    }
    routing = RoutingConfig(**read_table(ctx, document.get("routing", {}), "routing", RoutingConfig))
    mapping = build_mapping(ctx, document.get("mapping", {}))
    http = build_http(ctx, document.get("http", {}))
    admin = build_admin(ctx, document["admin"]) if "admin" in document else None
    cluster = build_cluster(ctx, document.get("cluster", {}))
    security = SecurityConfig(
        **read_table(ctx, document.get("security", {}), "security", SecurityConfig)
    )
    acme_tables = named_tables(ctx, document.get("acme", {}), "acme")
    acme = {name: build_acme(ctx, name, t) for name, t in acme_tables.items()}
    tls = acme_subjects(tls, acme)

    # ``fallback = "default"`` names the routing default unless a destination is called so.
    if routing.default_destination and "default" not in destinations:
        http = dataclasses.replace(
            http,
            routes=tuple(
                dataclasses.replace(r, fallback=routing.default_destination)
                if r.fallback == "default"
                else r
                for r in http.routes
            ),
        )

    config = Config(
        server=server,
        tls=tls,
        listeners=listeners,
        capabilities=capabilities,
        oauth=oauth,
        destinations=destinations,
        routing=routing,
        mapping=mapping,
        http=http,
        admin=admin,
        cluster=cluster,
        security=security,
        source_path=source_path,
        acme=acme,
    )
    check_references(ctx, config)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return dataclasses.replace(config, warnings=tuple(ctx.warnings))


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    check_files: bool = True,
) -> Config:
    """Read and validate the TOML file at ``path`` exactly as startup does."""
    file = Path(path)
    try:
        document = tomllib.loads(file.read_bytes().decode("utf-8"))
    except OSError as exc:
        message = f"cannot read the file: {exc.strerror or exc}"
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except tomllib.TOMLDecodeError as exc:
        message = f"invalid TOML: {exc}"
    else:
        return parse_config(
            document,
            file.absolute().parent,
            env,
            check_files=check_files,
            source_path=file.absolute(),
        )
    raise ConfigError([Problem(str(file), message)])


def config_path_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """``$STALROUTE_CONFIG``, else the reference name ``$PROXY_CONFIG``, else ``None``."""
    variables = os.environ if env is None else env
    return next((variables[name] for name in ENV_CONFIG if variables.get(name)), None)
