"""The configuration (SPEC §2): one TOML file → frozen dataclasses, validated up front.

The package, in the order a file is read:

* :mod:`~stalroute.config.reader`: the table-driven reader, :class:`Problem` and
  :class:`ConfigError` (every problem of a file, each with its TOML key path);
* :mod:`~stalroute.config.converters`: TOML values → Python values (durations, addresses,
  paths, URLs, ...);
* :mod:`~stalroute.config.protocols`: the listener protocols, one entry each;
* :mod:`~stalroute.config.schema`: the section dataclasses, rooted at :class:`Config`;
* :mod:`~stalroute.config.stores`: ``[mapping]`` and the registry of mapping store kinds;
* :mod:`~stalroute.config.sections`: the builders that resolve and check each section;
* :mod:`~stalroute.config.checks`: the checks that span sections;
* :mod:`~stalroute.config.loader`: :func:`load_config` and :func:`parse_config`.

What the rest of stalroute uses is re-exported here.
"""

from stalroute.config.converters import parse_address, parse_duration
from stalroute.config.loader import config_path_from_env, load_config, parse_config
from stalroute.config.reader import ConfigError, Problem
from stalroute.config.protocols import (
    DEFAULT_IMAP_ADVERTISE,
    DEFAULT_SIEVE_EXTENSIONS,
    DEFAULT_SIEVE_IMPLEMENTATION,
    DEFAULT_SUBMISSION_EHLO,
    PASSTHROUGH_PROTOCOLS,
)
from stalroute.config.schema import (
    ENV_ADMIN_TOKEN,
    AdminConfig,
    AcmeConfig,
    CapabilitiesConfig,
    CertificateConfig,
    ClusterConfig,
    ClusterRolesConfig,
    Config,
    DestinationConfig,
    DestinationProtocolConfig,
    HTTPConfig,
    HTTPExtractConfig,
    HTTPRouteConfig,
    ListenerConfig,
    OAuthConfig,
    ProtocolCapabilities,
    RoutingConfig,
    SecurityConfig,
    ServerConfig,
    TLSConfig,
    TLSProtocolsConfig,
)
from stalroute.config.stores import (
    FileMappingConfig,
    MappingConfig,
    RedisMappingConfig,
    SQLMappingConfig,
    StoreSettings,
)

__all__ = [
    "DEFAULT_IMAP_ADVERTISE",
    "DEFAULT_SIEVE_EXTENSIONS",
    "DEFAULT_SIEVE_IMPLEMENTATION",
    "DEFAULT_SUBMISSION_EHLO",
    "ENV_ADMIN_TOKEN",
    "PASSTHROUGH_PROTOCOLS",
    "AcmeConfig",
    "AdminConfig",
    "CapabilitiesConfig",
    "CertificateConfig",
    "ClusterConfig",
    "ClusterRolesConfig",
    "Config",
    "ConfigError",
    "DestinationConfig",
    "DestinationProtocolConfig",
    "FileMappingConfig",
    "HTTPConfig",
    "HTTPExtractConfig",
    "HTTPRouteConfig",
    "ListenerConfig",
    "MappingConfig",
    "OAuthConfig",
    "Problem",
    "ProtocolCapabilities",
    "RedisMappingConfig",
    "RoutingConfig",
    "SQLMappingConfig",
    "SecurityConfig",
    "ServerConfig",
    "StoreSettings",
    "TLSConfig",
    "TLSProtocolsConfig",
    "config_path_from_env",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_duration",
]
