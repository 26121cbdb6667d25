"""The table-driven reader: TOML tables in, dataclass field values and located problems out.

A dataclass field declared with :func:`setting` is a TOML key: its converter turns the TOML
value into the Python value, and its TOML name is the field's (``from`` is spelled ``from_``).
:func:`read_table` reads every such key of a table, collecting each problem with its key path
in the :class:`Context` instead of raising, so an operator fixes a file in one pass.  Unknown
keys are problems too, with a "did you mean" hint: silently ignored typos are how a mistyped
``proxy_trusted`` turns into an open relay for forged client addresses.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

# --- problems ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One configuration problem, located by its TOML key path (``listener.imaps.bind[1]``)."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason (section by section)."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class Invalid(Exception):
    """Raised by a converter: the value at the key being read is wrong for this reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class Context:
    """What the validator carries while it walks the document."""

    base_dir: Path
    env: Mapping[str, str]
    #: False for ``stalroute check --skip-files``: nothing on the file system is read.
    check_files: bool
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def error(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message))

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(Problem(key, message))


#: ``(TOML value, context, key path) → converted value``, or raise :class:`Invalid`.
Converter = Callable[[Any, Context, str], Any]

# --- formatting for messages -------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def join_key(path: str, name: str) -> str:
    """Append a key to a dotted path, quoting it the way TOML would when it is not bare."""
    part = name if _BARE_KEY.match(name) else json.dumps(name)
    return f"{path}.{part}" if path else part


def show(value: Any) -> str:
    """A value as the operator wrote it in TOML (strings in double quotes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def kind(value: Any) -> str:
    """A TOML type name for error messages (never the value itself: it may be a secret)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def suggest(name: str, choices: Iterable[str], *, list_all: bool = True) -> str:
    """`` (did you mean "x"?)`` when a choice is close to ``name``, else the (short) full list."""
    ordered = sorted(choices)
    close = difflib.get_close_matches(name, ordered, n=1, cutoff=0.6)
    if close:
        return f' (did you mean "{close[0]}"?)'
    if list_all and ordered and len(ordered) <= 12:
        return " (expected one of: " + ", ".join(ordered) + ")"
    return ""


def article(protocol: str) -> str:
    """``"an imap"`` / ``"a pop3"``: the article as the protocol name is spoken."""
    return f"an {protocol}" if protocol in ("imap", "smtp", "lmtp", "http") else f"a {protocol}"


# --- declaring and reading keys ----------------------------------------------------------


def setting(conv: Converter, default: Any = MISSING, *, toml: str | None = None,
            **kw: Any) -> Any:
    """Declare a dataclass field as a TOML key with its converter (and optional TOML name)."""
    metadata = {"conv": conv, "toml": toml}
    if default is MISSING:
        return field(metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def toml_keys(cls: type, only: Iterable[str] | None = None) -> dict[str, dataclasses.Field[Any]]:
    """TOML name → dataclass field, for the fields of ``cls`` that are TOML keys."""
    keys = {}
    for f in dataclasses.fields(cls):
        if "conv" in f.metadata and (only is None or f.name in only):
            keys[f.metadata["toml"] or f.name] = f
    return keys


def required_keys(cls: type) -> list[str]:
    """The TOML keys of ``cls`` that have no default."""
    return [name for name, f in toml_keys(cls).items()
            if f.default is MISSING and f.default_factory is MISSING]


def as_table(ctx: Context, value: Any, path: str) -> dict[str, Any]:
    """``value`` when it is a table; otherwise a problem at ``path`` and an empty table."""
    if isinstance(value, dict):
        return value
    ctx.error(path, f"must be a table, not {kind(value)}")
    return {}


def check_unknown(ctx: Context, table: dict[str, Any], path: str, known: Iterable[str]) -> None:
    """A problem for every key of ``table`` that is not in ``known``."""
    names = list(known)
    for name in table:
        if name not in names:
            ctx.error(join_key(path, name), "unknown key" + suggest(name, names))


def read_table(
    ctx: Context,
    table: Any,
    path: str,
    cls: type,
    *,
    subtables: Iterable[str] = (),
    only: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Read the TOML keys of ``cls`` (or the ``only`` subset) from ``table``; never raise.

    Returns ``{field name: value}`` for every key that is present or required; absent optional
    keys are left out so the dataclass default applies.  A key that fails conversion (or a
    missing required one) is reported and maps to ``None``, so the caller can still build its
    dataclass and keep validating the rest; the collected problems are raised at the end.
    """
    table = as_table(ctx, table, path)
    keys = toml_keys(cls, only)
    check_unknown(ctx, table, path, [*keys, *subtables])
    values: dict[str, Any] = {}
    for toml_name, f in keys.items():
        key = join_key(path, toml_name)
        if toml_name in table:
            try:
                values[f.name] = f.metadata["conv"](table[toml_name], ctx, key)
            except Invalid as exc:
                ctx.error(key, exc.message)
                values[f.name] = None
        elif f.default is MISSING and f.default_factory is MISSING:
            ctx.error(key, "required key is missing")
            values[f.name] = None
    return values


_NAME_CHARS = re.compile(r"^[^\s\x00-\x1f\x7f]+$")


def named_tables(ctx: Context, value: Any, path: str) -> dict[str, dict[str, Any]]:
    """``[section.<name>]`` tables: name → table, reporting names and non-table members."""
    out = {}
    for name, table in as_table(ctx, value, path).items():
        key = join_key(path, name)
        if not _NAME_CHARS.match(name):
            ctx.error(key, "names must not contain spaces or control characters")
        if isinstance(table, dict):
            out[name] = table
        else:
            ctx.error(key, f"must be a table, not {kind(table)}")
    return out
