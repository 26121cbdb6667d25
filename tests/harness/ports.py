"""Free TCP ports on the loopback interface.

The ports handed out lie below the kernel's ephemeral range (``ip_local_port_range``): a port
chosen here is only bound a moment later by the server it is for, and meanwhile any outgoing
connection on the machine takes an ephemeral port, which would collide if the two ranges
overlapped (a test's client, a proxy's backend leg, a benchmark next door).
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections import deque
from collections.abc import Iterator
from pathlib import Path

LOOPBACK = "127.0.0.1"
#: The lowest port handed out.
LOWEST_PORT = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: The ports this process handed out lately, not handed out again: two servers given ports by
#: separate calls, neither listening yet, would otherwise be able to get the same one (two
#: Dovecot nodes of one test once did). Bounded: the oldest are forgotten first.
_handed_out: deque[int] = deque(maxlen=8_192)


def _below_ephemeral() -> int:
    """The first port the kernel may give to an outgoing connection (32768 by default)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    return 32_768


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return ``count`` distinct free ports (all held open together, so none repeats)."""
    with held_ports(count, host) as ports:
        return ports


@contextlib.contextmanager
def held_ports(count: int, host: str = LOOPBACK) -> Iterator[list[int]]:
    """``count`` free ports, held (bound, not listening) until the block ends: so that the
    ports other servers pick meanwhile are not these."""
    highest = _below_ephemeral() - 1
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            port = random.randint(LOWEST_PORT, highest)
            if port in _handed_out:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
            except OSError:  # taken (or held by this very call): try another
                sock.close()
                continue
            ports.append(stack.enter_context(sock).getsockname()[1])
        _handed_out.extend(ports)
        yield ports


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
