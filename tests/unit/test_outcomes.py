"""Outcomes are an enum whose members are the strings logs and metrics show, and a connection
has none until it ends (issue 12: "client_closed" no longer doubles as "unset").
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from stalroute.outcomes import PROBE_OUTCOMES, Outcome
from tests.harness.memory import lose
from tests.unit.test_session_lifecycle import Pipeline

PACKAGE = Path(__file__).resolve().parents[2] / "stalroute"
#: Calls whose one argument, a string, is an outcome (any call's ``outcome=`` is one too).
OUTCOME_CALLS = {"close", "_refuse"}


def test_an_outcome_is_the_string_logs_and_metrics_show() -> None:
    outcome = Outcome.CLIENT_CLOSED
    assert outcome == "client_closed" and hash(outcome) == hash("client_closed")
    assert str(outcome) == f"{outcome}" == "{}".format(outcome) == "client_closed"
    assert type(str(outcome)) is str
    assert json.dumps({"outcome": outcome}) == '{"outcome": "client_closed"}'
    assert all(member.value == member.name.lower() for member in Outcome)
    assert PROBE_OUTCOMES <= set(Outcome)


def outcome_expressions(node: ast.AST) -> list[ast.expr]:
    """What ``node`` gives as an outcome: assigned to an ``outcome`` attribute or name (or
    its default), compared with one, passed as ``outcome=`` or to a closing call."""
    def named(target: ast.expr) -> bool:
        return ((isinstance(target, ast.Attribute) and target.attr == "outcome")
                or (isinstance(target, ast.Name) and target.id == "outcome"))

    if isinstance(node, ast.Assign) and any(named(target) for target in node.targets):
        return [node.value]
    if isinstance(node, ast.AnnAssign) and named(node.target) and node.value is not None:
        return [node.value]
    if isinstance(node, ast.Compare) and any(map(named, [node.left, *node.comparators])):
        return [node.left, *node.comparators]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        arguments = node.args
        positional = [*arguments.posonlyargs, *arguments.args]
        defaults = zip(positional[len(positional) - len(arguments.defaults):],
                       arguments.defaults)
        keyword = zip(arguments.kwonlyargs, arguments.kw_defaults)
        return [default for argument, default in [*defaults, *keyword]
                if argument.arg == "outcome" and default is not None]
    if isinstance(node, ast.Call):
        given = [keyword.value for keyword in node.keywords if keyword.arg == "outcome"]
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in OUTCOME_CALLS and len(node.args) == 1 and isinstance(
                node.args[0], (ast.Constant, ast.IfExp)):
            given.append(node.args[0])
        return given
    return []


def written_outcomes(sources: dict[str, str]) -> dict[str, str]:
    """Every string literal given as an outcome in ``sources`` (name → text), with where."""
    found: dict[str, str] = {}
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text, name)):
            for expression in outcome_expressions(node):
                for value in ast.walk(expression):  # "a" if x else "b" holds two
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        found.setdefault(value.value, f"{name}:{value.lineno}")
    return found


def test_the_reader_finds_outcomes_given_as_strings() -> None:
    source = """
class C:
    def _fatal(self, status, outcome="bad_request"):
        self.outcome = "idle" if status else "timeout"
        self.close("kicked")
        record(outcome="health")
        if ex.outcome == "client_error":
            pass
"""
    assert set(written_outcomes({"c.py": source})) == {
        "bad_request", "idle", "timeout", "kicked", "health", "client_error"}


def test_every_outcome_stalroute_writes_is_an_outcome() -> None:
    """No outcome is written as a bare string: the enum is the one list of outcomes."""
    sources = {str(path.relative_to(PACKAGE.parent)): path.read_text()
               for path in sorted(PACKAGE.rglob("*.py"))}
    assert written_outcomes(sources) == {}


def test_a_connection_has_no_outcome_until_it_ends(tmp_path) -> None:
    pipeline = Pipeline(tmp_path)
    session, client = pipeline.client()
    assert session.outcome is None
    session.dataReceived(b"a1 NOOP\r\n")
    lose(session, client)
    assert session.outcome is Outcome.CLIENT_CLOSED  # resolved when it ended
    [(key, count)] = pipeline.runtime.metrics.sessions.items()
    assert key == ("imap", "-", "client_closed") and count == 1
    assert type(key[2]) is str  # metric labels stay plain strings


def test_a_spliced_session_forgets_how_its_pre_auth_ended(tmp_path) -> None:
    """A refused login is the outcome of a session that ends in pre-auth; once a later
    login is spliced, the session's outcome is unset again until it ends."""
    pipeline = Pipeline(tmp_path)
    session, client = pipeline.client()
    session.dataReceived(b"a1 LOGIN alice wrong\r\n")
    backend, server = pipeline.backend()
    backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
    backend.dataReceived(b"a1 NO [AUTHENTICATIONFAILED] nope\r\n")
    assert session.outcome is Outcome.AUTH_FAILED
    lose(backend, server)
    session.dataReceived(b"a2 LOGIN alice secret\r\n")
    backend, server = pipeline.backend()
    backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
    backend.dataReceived(b"a2 OK logged in\r\n")
    assert session.outcome is None
    lose(session, client, clean=False)
    assert session.outcome is Outcome.CLIENT_ERROR  # a spliced connection that broke
    lose(backend, server)
    pipeline.assert_empty()
