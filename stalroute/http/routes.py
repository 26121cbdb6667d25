"""Which ``[[http.route]]`` a request takes, and which account it names (SPEC §2.9, §4). Sans-IO.

Routes are tried in order; the first whose ``match`` glob fits the request path wins. Globs:
``**`` spans any number of path segments (``/admin/**`` matches ``/admin``, ``/admin/`` and
``/admin/a/b``), ``*`` and ``?`` stay inside one segment, everything else is literal, and a
trailing slash is ignored on both sides (``/login`` matches ``/login/``). Matching takes time
linear in the path's length, whatever the glob (:class:`PathGlob`).

The path a glob sees is normalised so that encodings cannot dodge a pinned route: the query
and fragment are cut, percent-encodings are decoded (except ``%2F``, which stays inside its
segment), ``.``/``..`` segments are resolved and empty segments dropped. The request the
backend receives keeps its original target.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote_plus

from stalroute.config import HTTPExtractConfig, HTTPRouteConfig
from stalroute.identity import InvalidIdentifier, account_from_token, routing_identifier

__all__ = [
    "Decision",
    "PathGlob",
    "Route",
    "RouteTable",
    "Target",
    "account_from_authorization",
    "decide",
    "extract_identifier",
    "extraction_source",
    "normalize_path",
    "split_target",
]

#: Longest identifier taken from a header, query parameter or body before validation.
MAX_RAW_IDENTIFIER = 4096

_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


# --- request targets ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A request target split for routing and forwarding.

    ``origin`` is what the backend receives (``path?query``; an absolute-form target is
    reduced to it, its authority given in ``authority`` to replace ``Host``).
    """

    path: str
    query: str
    origin: bytes
    authority: bytes | None = None


def split_target(target: bytes) -> Target:
    """Split an HTTP/1.1 request target (origin-, absolute- or asterisk-form)."""
    text = target.decode("latin-1")
    authority = None
    origin = target
    if text == "*":
        return Target(path="*", query="", origin=target)
    if _ABSOLUTE.match(text):
        rest = text.split("://", 1)[1]
        slash = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority = rest[:slash].rpartition("@")[2].encode("latin-1") or None
        remainder = rest[slash:]
        if not remainder.startswith("/"):
            remainder = "/" + remainder
        origin = remainder.encode("latin-1")
        text = remainder
    without_fragment = text.split("#", 1)[0]
    path, _, query = without_fragment.partition("?")
    return Target(path=path, query=query, origin=origin, authority=authority)


def _percent_decode(path: str) -> str:
    def decode(match: re.Match[bytes]) -> bytes:
        value = int(match.group(1), 16)
        return match.group(0).upper() if value == 0x2F else bytes([value])

    raw = _PERCENT.sub(decode, path.encode("latin-1"))
    return raw.decode("utf-8", "replace")


def normalize_path(path: str) -> str:
    """The form of ``path`` that route globs are matched against (no trailing slash:
    the root is the empty string)."""
    if path == "*":
        return ""
    if (path[:1] == "/" and path[-1] != "/" and "//" not in path and "/." not in path
            and "%" not in path and path.isascii()):
        return path  # already normal: the usual case, worth skipping the work below
    segments: list[str] = []
    for segment in _percent_decode(path).split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "".join("/" + segment for segment in segments)


# --- globs and the route table -------------------------------------------------------------
#
# A glob is matched in O(len(path) × len(glob)) steps, never by backtracking. It is cut at its
# ``**`` into *pieces* of literals, ``?`` and ``*``. A ``**`` between two pieces takes any
# text, so each piece is placed where it ends earliest (a later end never helps the pieces
# after it); ``/**`` likewise, except that the piece before it must end at a segment end.
# Inside a piece ``*`` and ``?`` never take ``/``, so the piece's slashes fall on the path's:
# each *part* (between two slashes) lies in one segment, where each ``*``-free chunk goes to
# its first fit and the last one, when the part must fill the segment, to the segment's end.
# Each piece is one regex doing exactly that: lazy scans inside atomic groups, so a placement
# is never revisited, tried only at the piece's starting point and at segment starts, so each
# segment is read a bounded number of times per chunk.

class _Tail(enum.Enum):
    """Where a glob piece must end."""

    ANYWHERE = enum.auto()
    SEGMENT_END = enum.auto()
    END = enum.auto()


def _chunk_regex(glob: str) -> str:
    return "".join("[^/]" if char == "?" else re.escape(char) for char in glob)


def _part_regex(glob: str, *, head: bool, fill: bool) -> str:
    """One part inside one segment: starting where the match starts if ``head`` (else at its
    first fit), ending at the segment's end if ``fill`` (else as early as it can)."""
    chunks = [_chunk_regex(chunk) for chunk in glob.split("*")]
    out = []
    for index, chunk in enumerate(chunks):
        scan = "" if head and index == 0 else "[^/]*?"
        if fill and index == len(chunks) - 1:
            out.append(f"{scan}{chunk}(?![^/])")
        elif chunk:
            out.append(f"(?>{scan}{chunk})" if scan else chunk)
    return "(?>" + "".join(out) + ")"


def _piece_regex(glob: str, *, head: bool, tail: _Tail,
                 segment_start: bool = False) -> re.Pattern[str]:
    """A piece, its first part starting where the match starts if ``head``; matching only
    at the start of a segment if ``segment_start``."""
    parts = glob.split("/")
    last = len(parts) - 1
    regex = "/".join(
        _part_regex(part, head=head or index > 0,
                    fill=index < last or tail is not _Tail.ANYWHERE)
        for index, part in enumerate(parts))
    start = "(?<![^/])" if segment_start else ""
    return re.compile(start + regex + (r"\Z" if tail is _Tail.END else ""), re.DOTALL)


class PathGlob:
    """A ``match`` glob, compiled. Its meaning is that of a regex: ``/**`` followed by ``/`` or
    the end is ``(?:/.*)?``, any other ``**`` is ``.*``, ``*`` is ``[^/]*``, ``?`` is
    ``[^/]``, the rest is literal, and trailing slashes of the glob are cut."""

    __slots__ = ("pattern", "_pieces")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        glob = pattern.rstrip("/")
        pieces: list[str] = []
        tails: list[_Tail] = []  # where pieces[i] must end: before a ``/**`` or a bare ``**``
        current: list[str] = []
        i = 0
        while i < len(glob):
            if glob.startswith("/**", i) and (i + 3 == len(glob) or glob[i + 3] == "/"):
                tails.append(_Tail.SEGMENT_END)
                i += 3
            elif glob.startswith("**", i):
                tails.append(_Tail.ANYWHERE)
                i += 2
            else:
                current.append(glob[i])
                i += 1
                continue
            pieces.append("".join(current))
            current = []
        pieces.append("".join(current))
        tails.append(_Tail.END)
        #: Per piece: the regex tried where the previous piece ended, and (after the first
        #: piece) the same regex for the segments after that one.
        self._pieces = tuple(
            (_piece_regex(piece, head=index == 0, tail=tail),
             _piece_regex(piece, head=False, tail=tail, segment_start=True) if index else None)
            for index, (piece, tail) in enumerate(zip(pieces, tails)))

    def matches(self, path: str) -> bool:
        """Does the glob match all of ``path`` (a :func:`normalize_path` result)?"""
        pos = 0
        for here, later in self._pieces:
            found = here.match(path, pos)
            if found is None and later is not None:
                slash = path.find("/", pos)
                found = None if slash < 0 else later.search(path, slash + 1)
            if found is None:
                return False
            pos = found.end()
        return True


@dataclass(frozen=True)
class Route:
    """One compiled ``[[http.route]]`` (``index`` is its position in the file)."""

    index: int
    config: HTTPRouteConfig
    glob: PathGlob

    @property
    def needs_body(self) -> bool:
        extract = self.config.extract
        return extract is not None and extract.from_ == "body"

    def matches(self, normalized_path: str) -> bool:
        return self.glob.matches(normalized_path)


class RouteTable:
    """The routes of ``[http]`` in file order; :meth:`match` returns the first that fits."""

    def __init__(self, routes: Iterable[HTTPRouteConfig]) -> None:
        self.routes = tuple(
            Route(index, route, PathGlob(route.match)) for index, route in enumerate(routes)
        )

    def match(self, normalized_path: str) -> Route | None:
        for route in self.routes:
            if route.matches(normalized_path):
                return route
        return None


# --- identifier extraction --------------------------------------------------------------------


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > MAX_RAW_IDENTIFIER:
        return None
    return value


def account_from_authorization(value: bytes, jwt_username_claim: str) -> str | None:
    """``Basic`` → the login before ``:``; ``Bearer`` → the token's account (§4)."""
    scheme, _, credentials = value.strip().partition(b" ")
    scheme = scheme.lower()
    credentials = credentials.strip()
    if scheme == b"basic":
        try:
            padded = credentials + b"=" * (-len(credentials) % 4)
            decoded = base64.b64decode(padded, validate=True)
        except (binascii.Error, ValueError):
            return None
        login, colon, _password = _text(decoded).partition(":")
        return _clean(login) if colon else None
    if scheme == b"bearer":
        try:
            token = credentials.decode("ascii")
        except UnicodeDecodeError:
            return None
        return _clean(account_from_token(token, jwt_username_claim))
    return None


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    name = name.lower()
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def extraction_source(extract: HTTPExtractConfig, *,
                      headers: Sequence[tuple[bytes, bytes]], query: str) -> bytes | str | None:
    """The part of a request that :func:`extract_identifier` reads, for ``extract`` sources
    other than ``body`` (None: ``body``, or the header is absent): two requests whose parts
    are equal yield the same identifier."""
    source = extract.from_
    if source == "authorization":
        return _header(headers, b"authorization")
    if source == "header":
        return _header(headers, (extract.header or "").encode("latin-1"))
    if source == "query":
        return query
    return None


def extract_identifier(
    extract: HTTPExtractConfig,
    *,
    headers: Sequence[tuple[bytes, bytes]],
    query: str,
    body: bytes | None,
    jwt_username_claim: str = "email",
) -> str | None:
    """The raw identifier ``extract`` finds in a request, or None.

    ``body`` is the buffered prefix of the body (at most ``body_extract_cap`` bytes); it is
    form-decoded (``+`` and percent-escapes) before ``regex`` is searched in it.
    """
    source = extract.from_
    if source == "authorization":
        value = _header(headers, b"authorization")
        return None if value is None else account_from_authorization(value, jwt_username_claim)
    if source == "header":
        value = _header(headers, (extract.header or "").encode("latin-1"))
        return None if value is None else _clean(_text(value))
    if source == "query":
        values = parse_qs(query, keep_blank_values=False, errors="replace").get(extract.param or "")
        return _clean(values[0]) if values else None
    if source == "body":
        if not body or extract.regex is None:
            return None
        decoded = unquote_plus(body.decode("utf-8", "replace"), errors="replace")
        match = extract.regex.search(decoded)
        return _clean(match.group(1)) if match and match.group(1) is not None else None
    return None


# --- the decision ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Where a request goes: a destination by name, or an identifier for the router."""

    destination: str | None = None
    identifier: str | None = None
    #: Why ``destination`` was chosen: ``pinned``, ``fallback`` or ``default``.
    reason: str = "resolved"


def decide(
    route: Route,
    raw_identifier: str | None,
    *,
    separators: Sequence[str],
    normalize: str,
    default_destination: str,
) -> Decision:
    """Pinned destination, else the extracted identifier (master-user suffix stripped and
    normalised as for logins), else the route's ``fallback``, else the default destination.

    An identifier that cannot be routed on (control characters, quotes, too long) counts as
    no identifier: HTTP has no XCLIENT/ID to inject it into, and the backend still
    authenticates the request.
    """
    if route.config.destination:
        return Decision(destination=route.config.destination, reason="pinned")
    identifier = None
    if raw_identifier is not None:
        try:
            identifier = routing_identifier(raw_identifier, separators, normalize)
        except InvalidIdentifier:
            identifier = None
    if identifier is not None:
        return Decision(identifier=identifier)
    if route.config.fallback:
        return Decision(destination=route.config.fallback, reason="fallback")
    return Decision(destination=default_destination, reason="default")
