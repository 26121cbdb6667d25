"""Run a Python program under cProfile on the process's CPU clock; write the profile on SIGUSR1.

``python bench/cpu_profile.py OUT -c CODE [ARG ...]`` runs ``CODE`` as ``python -c CODE ARG ...``
would, profiled, and writes the profile to ``OUT`` (atomically) each time it gets SIGUSR1. The
benches start stalroute through it for ``--profile`` (``tests/harness/stalroute.py`` runs twistd
with ``-c``). cProfile's default clock is wall time: on a busy machine a ``send()`` that wakes
its receiver is often descheduled inside the call and ranks high though it costs little CPU; on
the CPU clock (``time.process_time``) a function's time is the CPU the process spent in it.
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
import time
from types import FrameType


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-c":
        raise SystemExit("usage: cpu_profile.py OUT -c CODE [ARG ...]")
    out, code = sys.argv[1], sys.argv[3]
    sys.argv = ["-c", *sys.argv[4:]]
    profile = cProfile.Profile(time.process_time)

    def write(_signal: int, _frame: FrameType | None) -> None:
        profile.disable()
        profile.dump_stats(out + ".tmp")
        os.replace(out + ".tmp", out)
        profile.enable()

    signal.signal(signal.SIGUSR1, write)
    profile.enable()
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main()
