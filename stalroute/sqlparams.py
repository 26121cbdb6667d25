"""Placeholders of the ``[mapping.sql]`` statements: which parameters each uses, and its text
in the driver's style. Pure (no database, no Twisted), so the configuration validator and the
SQL store read a statement the same way.

Both engines take ``$1`` (the identifier) and ``$2`` (the destination). SQLite also takes its
own ``?NNN`` and ``?`` (numbered as SQLite numbers it: one more than the largest number
assigned so far); PostgreSQL does not, since ``?`` is an operator there (``jsonb ? key``) and
psycopg2 has no such placeholder. Every parameter becomes psycopg2's named ``%(pN)s`` (a
literal ``%`` doubled) or SQLite's ``?N``. Quoted strings, quoted identifiers, dollar-quoted
bodies and comments are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Placeholder", "parameter_problem", "translate"]

#: The engines of ``SQLMappingConfig.backend``.
ENGINES = ("postgresql", "sqlite")
#: More digits than any usable parameter number (SQLite allows up to 32766).
_MAX_DIGITS = 6

# One alternation, scanned left to right: the first branch skips text where "$1", "?" and
# "%" mean nothing special (except that psycopg2 formats "%" everywhere).
_LEXEMES = re.compile(
    r"""
      (?P<skip>
          (?<![\w$])[Ee]'(?:[^'\\]|\\.|'')*'             # escape string E'it\'s'
        | '(?:[^']|'')*'                                 # string literal
        | "(?:[^"]|"")*"                                 # quoted identifier
        | --[^\n]*                                       # line comment
        | /\*.*?\*/                                      # block comment
        | \$(?P<tag>(?:[A-Za-z_][A-Za-z_0-9]*)?)\$.*?\$(?P=tag)\$   # dollar-quoted body
      )
    | \$(?P<dollar>[0-9]+)                               # $N, both engines
    | \?(?P<question>[0-9]*)                             # ?NNN or ?, SQLite only
    | (?P<percent>%)
    """,
    re.S | re.X,
)


@dataclass(frozen=True)
class Placeholder:
    """One parameter of a statement: its number and how it was written (``$1``, ``?``)."""

    number: int
    written: str


def _number(digits: str) -> int:
    """``int(digits)``, but never of an unbounded digit string (any such number is unknown)."""
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def translate(sql: str, engine: str) -> tuple[str, list[Placeholder]]:
    """``sql`` in the driver's style for ``engine``, and its placeholders in order."""
    if engine not in ENGINES:
        raise ValueError(f"unknown SQL engine {engine!r}")
    sqlite = engine == "sqlite"
    found: list[Placeholder] = []

    def replace(match: re.Match[str]) -> str:
        if match["dollar"] is not None:
            number = _number(match["dollar"])
        elif match["question"] is not None and sqlite:
            digits = match["question"]
            number = _number(digits) if digits else max((p.number for p in found), default=0) + 1
        else:  # skipped text, a literal %, or "?" on PostgreSQL: text as it is
            text = match[0]
            return text if sqlite else text.replace("%", "%%")
        found.append(Placeholder(number, match[0]))
        return f"?{number}" if sqlite else f"%(p{number})s"

    return _LEXEMES.sub(replace, sql), found


def parameter_problem(sql: str, engine: str, names: Sequence[str]) -> str | None:
    """Why ``sql`` cannot take the parameters ``names`` (``$1`` the first…), or None.

    Every parameter must be used (a lookup without ``$1`` would give every account the same
    answer) and none may be unknown; a statement that takes none must use none.
    """
    _, placeholders = translate(sql, engine)
    wanted = set(range(1, len(names) + 1))
    if not names and placeholders:
        return (f"must not use parameters ({placeholders[0].written} found): it lists every "
                "mapping, as rows of identifier, destination")
    meaning = ", ".join(f"${n} the {name}" for n, name in enumerate(names, start=1))
    for placeholder in placeholders:
        if placeholder.number not in wanted:
            shown = placeholder.written
            if shown == "?":
                shown = f"? (numbered ?{placeholder.number})"
            return f"unknown parameter {shown} (this statement gets {meaning})"
    used = {placeholder.number for placeholder in placeholders}
    if missing := sorted(wanted - used):
        spelling = ("$1, $2 or SQLite's ?1, ?2 and ?" if engine == "sqlite"
                    else "$1, $2: PostgreSQL has no ? placeholder")
        return (f"must use ${missing[0]} (this statement gets {meaning}; write placeholders "
                f"as {spelling})")
    return None
