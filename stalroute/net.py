"""IP addresses and networks as the configuration writes them and peers report them.

Kept apart from the configuration because the connection code asks these questions for every
client (is the peer a trusted balancer? exempt from bans?), long after the file was read.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_cidr(text: str) -> IPNetwork:
    """``ip`` or ``ip/prefix`` → network; host bits are tolerated (``10.0.0.1/8`` is 10/8)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        shown = json.dumps(text, ensure_ascii=False)
        raise ValueError(f"{shown} is not an IP address or CIDR (ip or ip/prefix)") from None


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IP address literal (not a name to resolve or verify)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ip_in_networks(ip: str | IPAddress, networks: Iterable[IPNetwork | str]) -> bool:
    """Whether ``ip`` lies in any of ``networks``.

    An IPv4 network also matches the IPv4-mapped IPv6 form of its addresses
    (``::ffff:10.0.0.1``), which is how a dual-stack socket reports IPv4 peers; the reverse
    (an IPv4 peer against ``::ffff:0:0/96``) holds too.  Unparsable input matches nothing.
    """
    try:
        address = (
            ip
            if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address))
            else (ipaddress.ip_address(str(ip).strip("[]").split("%", 1)[0]))
        )
    except ValueError:
        return False
    candidates: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    elif isinstance(address, ipaddress.IPv4Address):
        candidates.append(ipaddress.IPv6Address(f"::ffff:{address}"))
    for network in networks:
        if isinstance(network, str):
            try:
                network = ipaddress.ip_network(network, strict=False)
            except ValueError:
                continue
        if any(c.version == network.version and c in network for c in candidates):
            return True
    return False
