"""A stdlib SMTP sink: accepts every message and writes it to a directory (TEST-ENVIRONMENT §3).

Dovecot's submission service and Postfix relay to it, so tests can check what arrived (and
the ``Received:`` header the relaying server added). The server runs as a **child process**
(:class:`SMTPSink`, a :class:`~tests.harness.processes.ManagedProcess`, always reaped)::

    python -m tests.harness.smtp_sink --host 127.0.0.1 --port 2525 --dir /tmp/sink

Each message becomes ``<n>.eml`` (the DATA, dot-unstuffed, CRLF line ends) and then
``<n>.json`` (envelope: ``mail_from``, ``rcpt_to``, ``helo``, ``peer``); a message counts as
delivered once its JSON exists. Only the server part below the ``SMTPSink`` class runs in the
child, and it needs nothing but the standard library.

The dialogue is minimal RFC 5321: EHLO/HELO (advertising ``8BITMIME``, ``SMTPUTF8`` and
``SIZE``), MAIL, RCPT, DATA, RSET, NOOP, QUIT; anything else gets ``502``. No PIPELINING or
CHUNKING is advertised, so clients send one command at a time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from pathlib import Path

MAX_LINE = 64 * 1024
MAX_MESSAGE = 64 * 2**20

# --- the controller (test side) ----------------------------------------------------------------


@dataclass(frozen=True)
class SinkMessage:
    """One delivered message."""

    number: int
    mail_from: str
    rcpt_to: tuple[str, ...]
    helo: str
    peer: str
    data: bytes

    @property
    def message(self) -> Message:
        return message_from_bytes(self.data)

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject", ""))

    def received(self) -> list[str]:
        """The ``Received:`` headers, newest first, unfolded."""
        return [re.sub(r"\s+", " ", str(value)) for value in self.message.get_all("Received", [])]


class SMTPSink:
    """The sink as a managed child process on a free loopback port; a context manager.

    ``messages()`` lists what arrived, ``wait_for(predicate)`` waits for a matching one.
    """

    def __init__(self, directory: Path, *, host: str | None = None, port: int | None = None,
                 python: str = sys.executable) -> None:
        from tests.harness.ports import LOOPBACK, free_port
        from tests.harness.processes import ManagedProcess

        self.host = host or LOOPBACK
        self.port = port or free_port(self.host)
        self.dir = directory
        self.mail_dir = directory / "messages"
        repo_root = Path(__file__).resolve().parents[2]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(repo_root), os.environ.get("PYTHONPATH", "")) if p)
        self._process = ManagedProcess(
            [python, "-m", "tests.harness.smtp_sink", "--host", self.host,
             "--port", str(self.port), "--dir", self.mail_dir],
            name="smtp sink", output_path=directory / "sink.out", cwd=repo_root, env=env)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self, timeout: float = 15.0) -> SMTPSink:
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._process.start()
            self._process.wait_for_port(self.host, self.port, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._process.stop()

    def __enter__(self) -> SMTPSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._process.running

    def output_text(self) -> str:
        return self._process.output_text()

    def messages(self) -> list[SinkMessage]:
        """Every delivered message, oldest first."""
        found = []
        for meta_path in self.mail_dir.glob("*.json"):
            try:
                meta = json.loads(meta_path.read_text())
                data = meta_path.with_suffix(".eml").read_bytes()
            except (OSError, ValueError):
                continue
            found.append(SinkMessage(int(meta_path.stem), meta["mail_from"],
                                     tuple(meta["rcpt_to"]), meta["helo"], meta["peer"], data))
        return sorted(found, key=lambda m: m.number)

    def wait_for(self, predicate: Callable[[SinkMessage], bool],
                 timeout: float = 20.0) -> SinkMessage:
        """The first delivered message matching ``predicate``; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages():
                if predicate(message):
                    return message
            if time.monotonic() > deadline:
                subjects = [m.subject for m in self.messages()]
                raise TimeoutError(f"no matching message in the sink after {timeout}s; "
                                   f"subjects: {subjects}\n{self.output_text()[-2000:]}")
            time.sleep(0.05)

    def wait_for_subject(self, subject: str, timeout: float = 20.0) -> SinkMessage:
        return self.wait_for(lambda m: m.subject == subject, timeout)


# --- the server (child side, stdlib only) -----------------------------------------------------

_counter = itertools.count(1)
_counter_lock = threading.Lock()


class _SinkHandler(socketserver.StreamRequestHandler):
    server: _SinkServer

    def reply(self, text: str) -> None:
        self.wfile.write(text.encode("ascii") + b"\r\n")
        self.wfile.flush()

    def readline(self) -> bytes | None:
        line = self.rfile.readline(MAX_LINE + 2)
        if not line:
            return None
        return line.rstrip(b"\r\n")

    def handle(self) -> None:
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        helo = ""
        mail_from: str | None = None
        rcpt_to: list[str] = []
        self.reply(f"220 {self.server.hostname} ESMTP sink")
        while (line := self.readline()) is not None:
            verb, _, argument = line.decode("utf-8", "replace").partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                helo = argument.strip()
                self.reply(f"250-{self.server.hostname}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                           f"250 SIZE {MAX_MESSAGE}")
            elif verb == "HELO":
                helo = argument.strip()
                self.reply(f"250 {self.server.hostname}")
            elif verb == "MAIL":
                match = re.match(r"(?i)FROM:\s*<([^>]*)>", argument)
                if match is None:
                    self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
                    continue
                mail_from, rcpt_to = match.group(1), []
                self.reply("250 2.1.0 OK")
            elif verb == "RCPT":
                match = re.match(r"(?i)TO:\s*<([^>]*)>", argument)
                if mail_from is None or match is None:
                    self.reply("503 5.5.1 MAIL first" if mail_from is None
                               else "501 5.5.4 Syntax: RCPT TO:<address>")
                    continue
                rcpt_to.append(match.group(1))
                self.reply("250 2.1.5 OK")
            elif verb == "DATA":
                if mail_from is None or not rcpt_to:
                    self.reply("503 5.5.1 RCPT first")
                    continue
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data = self._read_data()
                if data is None:
                    return
                number = self._store(mail_from, rcpt_to, helo, peer, data)
                mail_from, rcpt_to = None, []
                self.reply(f"250 2.0.0 Ok: queued as SINK{number}")
            elif verb == "RSET":
                mail_from, rcpt_to = None, []
                self.reply("250 2.0.0 OK")
            elif verb == "NOOP":
                self.reply("250 2.0.0 OK")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("502 5.5.1 Command not implemented")

    def _read_data(self) -> bytes | None:
        lines: list[bytes] = []
        size = 0
        while True:
            line = self.rfile.readline(MAX_LINE + 2)
            if not line:
                return None
            line = line.rstrip(b"\r\n")
            if line == b".":
                return b"".join(part + b"\r\n" for part in lines)
            if line.startswith(b"."):
                line = line[1:]
            size += len(line) + 2
            if size <= MAX_MESSAGE:
                lines.append(line)

    def _store(self, mail_from: str, rcpt_to: list[str], helo: str, peer: str,
               data: bytes) -> int:
        with _counter_lock:
            number = next(_counter)
        directory: Path = self.server.directory
        eml = directory / f"{number:06d}.eml"
        eml.write_bytes(data)
        meta = {"mail_from": mail_from, "rcpt_to": rcpt_to, "helo": helo, "peer": peer}
        tmp = directory / f"{number:06d}.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(eml.with_suffix(".json"))
        print(f"stored {number}: from=<{mail_from}> to={rcpt_to} peer={peer} "
              f"bytes={len(data)}", flush=True)
        return number


class _SinkServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], directory: Path, hostname: str) -> None:
        self.directory = directory
        self.hostname = hostname
        super().__init__(address, _SinkHandler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SMTP sink writing messages to files")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--hostname", default="sink.test")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    with _SinkServer((args.host, args.port), args.dir, args.hostname) as server:
        print(f"listening on {args.host}:{args.port}", flush=True)
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
