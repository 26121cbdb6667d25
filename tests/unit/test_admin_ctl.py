"""``stalroute ctl`` without a server: argument parsing, where the URL and token come from,
the import batching (line numbers mapped back to the file), tables and the progress output.
The commands against a live proxy are in ``tests/integration/test_ctl.py``."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stalroute.admin.openapi import SPEC
from stalroute.cli import _build_parser
from stalroute.ctl import client, commands

TOKEN = "c" * 40


def parse(*argv: str) -> argparse.Namespace:
    return _build_parser().parse_args(["ctl", *argv])


def target(action: commands.Action) -> object:
    """A one-request subcommand as the request it sends, any other as its function."""
    if isinstance(action, commands.Request):
        return (action.method, action.path, action.params)
    return action


def test_options_before_or_after_the_subcommand() -> None:
    before = parse("--url", "https://h:1", "--json", "--insecure", "stats")
    after = parse("stats", "--url", "https://h:1", "--json", "--insecure")
    for args in (before, after):
        assert (args.url, args.json, args.insecure, target(args.ctl_action)) == (
            "https://h:1", True, True, ("GET", "/stats", ()))
    assert parse("stats").json is False


@pytest.mark.parametrize(("argv", "action"), [
    (["destinations"], ("GET", "/destinations", ())),
    (["destinations", "list"], ("GET", "/destinations", ())),
    (["destinations", "reset", "node2"], ("POST", "/destinations/reset", ("destination",))),
    (["mappings", "get", "alice"], commands.cmd_mappings_get),
    (["mappings", "put", "alice", "node2"],
     ("PUT", "/mappings", ("identifier", "destination"))),
    (["mappings", "delete", "alice"], ("DELETE", "/mappings", ("identifier",))),
    (["mappings", "reload"], ("POST", "/mappings/reload", ())),
    (["mappings", "export", "--format", "json"], commands.cmd_mappings_export),
    (["mappings", "import", "f.tsv", "--batch-size", "5", "--dry-run"],
     commands.cmd_mappings_import),
    (["cache", "invalidate"], ("POST", "/cache/invalidate", ("identifier",))),
    (["cache", "invalidate", "alice"], ("POST", "/cache/invalidate", ("identifier",))),
    (["connections"], ("GET", "/connections", ("identifier", "destination"))),
    (["connections", "list", "--destination", "node1"],
     ("GET", "/connections", ("identifier", "destination"))),
    (["kick", "--identifier", "alice"], commands.cmd_kick),
    (["delay", "alice", "30"], ("POST", "/connections/delay", ("identifier", "seconds"))),
    (["reload"], commands.cmd_reload),
    (["health", "--live"], commands.cmd_health),
    (["metrics"], commands.cmd_metrics),
])
def test_every_subcommand_parses(argv: list[str], action: object) -> None:
    args = parse(*argv)
    assert target(args.ctl_action) == action
    # every query parameter a request sends is an argument the subcommand parsed
    if isinstance(args.ctl_action, commands.Request):
        assert all(hasattr(args, name) for name in args.ctl_action.params)


def test_one_request_subcommands_call_documented_operations() -> None:
    """The table cannot drift from the API: each request is an operation of the OpenAPI
    document, and its parameters are that operation's query parameters."""
    requests = [entry.action for entry in commands.SUBCOMMANDS
                if isinstance(entry.action, commands.Request)]
    assert requests
    for request in requests:
        operation = SPEC["paths"][request.path][request.method.lower()]
        documented = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
        assert set(request.params) <= documented, (request.method, request.path)


def test_connections_list_filters() -> None:
    args = parse("connections", "list", "--destination", "node1")
    assert (args.identifier, args.destination) == (None, "node1")


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stalroute", "ctl", *argv],
                          capture_output=True, text=True, timeout=60, env=env,
                          cwd=Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("argv", [[], ["mappings"], ["cache"], ["delay", "alice"],
                                  ["delay", "alice", "soon"], ["nope"]])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    assert run(*argv).returncode == 2


def test_no_token_is_a_usage_error(tmp_path: Path) -> None:
    done = run("stats", env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "no admin token" in done.stderr


def test_unreachable_server_exits_1(tmp_path: Path) -> None:
    done = run("--url", "https://127.0.0.1:1", "stats", env={"STALROUTE_ADMIN_TOKEN": TOKEN})
    assert done.returncode == 1
    assert "cannot reach https://127.0.0.1:1" in done.stderr


# --- URL and token ------------------------------------------------------------------------------


def namespace(**values) -> argparse.Namespace:
    defaults = {"url": None, "config": None, "token_file": None}
    return argparse.Namespace(**{**defaults, **values})


def test_url_sources_in_order(tmp_path: Path) -> None:
    config = tmp_path / "stalroute.toml"
    config.write_text('[admin]\nbind = "0.0.0.0:9443"\n')
    v6 = tmp_path / "v6.toml"
    v6.write_text('[admin]\nbind = "[::]:9443"\n')
    assert client.resolve_url(namespace(url="https://x:1/"), {}) == "https://x:1"
    assert client.resolve_url(namespace(), {client.ENV_URL: "https://y:2"}) == "https://y:2"
    assert client.resolve_url(namespace(config=str(config)), {}) == "https://127.0.0.1:9443"
    assert client.resolve_url(namespace(config=str(v6)), {}) == "https://[::1]:9443"
    assert client.resolve_url(namespace(), {"STALROUTE_CONFIG": str(config)}) == \
        "https://127.0.0.1:9443"
    assert client.resolve_url(namespace(), {}) == client.DEFAULT_URL
    with pytest.raises(client.CtlError):
        client.resolve_url(namespace(config=str(tmp_path / "missing.toml")), {})


def test_token_sources_in_order(tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("from-file\n")
    config = tmp_path / "stalroute.toml"
    config.write_text('[admin]\nbind = "127.0.0.1:9443"\nbearer_token_file = "admin.token"\n')
    inline = tmp_path / "inline.toml"
    inline.write_text('[admin]\nbind = "127.0.0.1:9443"\nbearer_token = "inline"\n')
    env = {"STALROUTE_ADMIN_TOKEN": "from-env"}
    assert client.resolve_token(namespace(token_file=str(token_file)), env) == "from-file"
    assert client.resolve_token(namespace(config=str(config)), env) == "from-env"
    assert client.resolve_token(namespace(), {"PROXY_ADMIN_TOKEN": "alias"}) == "alias"
    assert client.resolve_token(namespace(config=str(config)), {}) == "from-file"
    assert client.resolve_token(namespace(config=str(inline)), {}) == "inline"
    with pytest.raises(client.CtlError) as raised:
        client.resolve_token(namespace(), {})
    assert raised.value.code == client.EXIT_USAGE


# --- import batching ------------------------------------------------------------------------------


def test_tsv_batches_keep_file_line_numbers() -> None:
    data = b"# comment\nalice\tnode2\n\nbob\tnode1\n" + b"x" * 5000 + b"\ncarol\tnode2"
    rejected: list[dict] = []
    batches = list(client.tsv_batches(io.BytesIO(data), 2, rejected))
    assert batches == [(b"alice\tnode2\nbob\tnode1\n", [2, 4], 2),
                       (b"carol\tnode2\n", [6], 1)]
    assert rejected == [{"line": 5, "reason": "line longer than 4096 bytes"}]


def test_json_batches_map_body_lines_to_file_lines() -> None:
    data = b'[\n{"identifier": "alice", "destination": "node2"},\n7,\n["bob", "node1"]\n]'
    rejected: list[dict] = []
    (body, numbers, rows), = client.json_batches(io.BytesIO(data), 10, rejected)
    assert rows == 2
    assert json.loads(body) == [{"identifier": "alice", "destination": "node2"},
                                {"identifier": "bob", "destination": "node1"}]
    # body line 2 holds alice (file line 2), body line 3 bob (file line 4)
    assert numbers[2 - 1] == 2 and numbers[3 - 1] == 4
    assert rejected[0]["line"] == 3


def test_count_rows_refuses_a_broken_json_file_before_sending(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"identifier": "a", "destination": "b"},\n{oops}]')
    with pytest.raises(client.CtlError, match="line 2"):
        client.count_rows(path, "json")


# --- output -----------------------------------------------------------------------------


def test_table() -> None:
    text = commands.format_table([{"a": "x", "b": None}, {"a": "longer", "b": 3}],
                                 [("a", "A"), ("b", "B")])
    assert text.splitlines() == ["A       B", "x       -", "longer  3"]


def test_duration() -> None:
    assert [commands.format_duration(s) for s in (5, 65, 3 * 3600 + 120, 2 * 86400 + 3600)] == [
        "5s", "1m05s", "3h02m", "2d01h00m"]


class Answering:
    """A client whose every request is answered ``document``."""

    def __init__(self, document: dict) -> None:
        self.document = document

    def call(self, method: str, path: str, params: object = None,
             accept: tuple[int, ...] = ()) -> tuple[int, dict]:
        return 200, self.document


@pytest.mark.parametrize(("fleet", "told"), [
    ({}, []),  # no coordinator: the answer says nothing of a fleet
    ({"applied": 3, "members": 3}, ["applied by 3 of 3 members"]),
    ({"applied": 2, "members": 3, "laggards": [2]},
     ["applied by 2 of 3 members; laggards: node 2"]),
    ({"applied": 1, "members": 3, "unreachable": [2, 3]},
     ["applied by 1 of 3 members; unreachable: node 2, node 3"]),
])
@pytest.mark.parametrize(("argv", "answer", "first"), [
    (["mappings", "put", "alice", "node2"], {"identifier": "alice", "destination": "node2"},
     "alice → node2"),
    (["kick", "--identifier", "alice"], {"identifier": "alice", "destination": None,
                                         "kicked": 2}, "kicked 2 sessions of alice"),
    (["delay", "alice", "30"], {"identifier": "alice", "seconds": 30}, "logins of alice held"),
])
def test_a_write_says_who_in_the_fleet_applied_it(capsys, fleet: dict, told: list[str],
                                                  argv: list[str], answer: dict,
                                                  first: str) -> None:
    args = parse(*argv)
    assert args.ctl_action(Answering({**answer, **fleet}), args) == client.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(first) and lines[1:] == told

    args = parse(*argv, "--json")
    args.ctl_action(Answering({**answer, **fleet}), args)
    assert json.loads(capsys.readouterr().out) == {**answer, **fleet}


class FakeTTY(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_bar_on_a_tty() -> None:
    stream = FakeTTY(True)
    progress = client.Progress(200, "importing x.tsv", stream)
    progress.update(100)
    progress.update(200, final=True)
    out = stream.getvalue()
    assert out.count("\r") == 2 and out.endswith("\n")
    assert "[###############---------------]  50% 100/200 rows" in out


def test_progress_lines_without_a_tty(monkeypatch) -> None:
    stream = FakeTTY(False)
    progress = client.Progress(200, "importing x.tsv", stream)
    progress.update(100)  # within the interval: nothing
    progress._last -= client.PROGRESS_INTERVAL
    progress.update(150)
    progress.update(200, final=True)
    lines = stream.getvalue().splitlines()
    assert [line.split(" rows")[0] for line in lines] == [
        "importing x.tsv: 150/200", "importing x.tsv: 200/200"]
    assert "\r" not in stream.getvalue()
