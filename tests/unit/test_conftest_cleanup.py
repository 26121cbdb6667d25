"""A test run stopped with SIGTERM (``timeout``, a cancelled CI job) still runs the fixtures'
teardown (``tests/conftest.py``), so the servers they started and their temp dirs go away.

A pytest child runs a test whose fixture starts a managed process and makes a directory, and
is sent SIGTERM while the test waits. Python's default for SIGTERM would end it at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.harness.stalroute import REPO_ROOT

INNER_TEST = '''
import time
import shutil
from pathlib import Path

import pytest

from tests.harness.processes import ManagedProcess

SCRATCH = Path({scratch!r})


@pytest.fixture
def server():
    SCRATCH.mkdir()
    process = ManagedProcess(["sleep", "300"], name="sleeper",
                             output_path=SCRATCH / "sleeper.out")
    process.start()
    (SCRATCH / "pid").write_text(str(process.pid))
    yield
    process.stop()
    shutil.rmtree(SCRATCH)


def test_waits(server):
    (SCRATCH / "ready").touch()
    time.sleep(300)
'''


def test_sigterm_runs_fixture_teardown(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER_TEST.format(scratch=str(scratch)))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         str(inner)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (scratch / "ready").exists():
            assert child.poll() is None, child.communicate()[0]
            assert time.monotonic() < deadline, "the inner test never started"
            time.sleep(0.1)
        sleeper = int((scratch / "pid").read_text())

        child.send_signal(signal.SIGTERM)
        output = child.communicate(timeout=60)[0]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    assert not scratch.exists(), output
    assert not Path(f"/proc/{sleeper}").exists(), output
