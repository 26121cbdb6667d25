"""HTTP route matching and identifier extraction (SPEC §2.9, §4): sans-IO, with hypothesis."""

from __future__ import annotations

import base64
import functools
import json
import re
import time
from urllib.parse import quote, urlencode

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from stalroute.config import HTTPExtractConfig, HTTPRouteConfig
from stalroute.http.routes import (
    PathGlob,
    RouteTable,
    account_from_authorization,
    decide,
    extract_identifier,
    normalize_path,
    split_target,
)

SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.@~", min_size=1, max_size=8) \
    .filter(lambda s: s not in (".", ".."))
SEGMENTS = st.lists(SEGMENT, max_size=6)


def path_of(segments: list[str], trailing: bool = False) -> str:
    return "/" + "/".join(segments) + ("/" if trailing and segments else "")


def matches(pattern: str, raw_path: str) -> bool:
    return PathGlob(pattern).matches(normalize_path(raw_path))


def route(match: str, **kwargs) -> HTTPRouteConfig:
    return HTTPRouteConfig(match=match, **kwargs)


def extract(source: str, **kwargs) -> HTTPExtractConfig:
    if "regex" in kwargs:
        kwargs["regex"] = re.compile(kwargs["regex"])
    return HTTPExtractConfig(from_=source, **kwargs)


# --- globs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/**", "/", True),
        ("/**", "/jmap/session", True),
        ("/admin/**", "/admin", True),
        ("/admin/**", "/admin/", True),
        ("/admin/**", "/admin/users/42", True),
        ("/admin/**", "/administrator", False),
        ("/admin/**", "/x/admin", False),
        ("/login", "/login", True),
        ("/login", "/login/", True),
        ("/login/", "/login", True),
        ("/login", "/login/x", False),
        ("/api/*/info", "/api/v1/info", True),
        ("/api/*/info", "/api/v1/v2/info", False),
        ("/a/**/b", "/a/b", True),
        ("/a/**/b", "/a/x/y/b", True),
        ("/a/**/b", "/a/x/y/c", False),
        ("/file?.txt", "/file1.txt", True),
        ("/file?.txt", "/file/.txt", False),
        ("/dav/**.ics", "/dav/cal/x.ics", True),
        ("/.well-known/jmap", "/.well-known/jmap", True),
        ("/", "/", True),
        ("/", "/x", False),
        # Encodings and dot segments cannot dodge a pinned route.
        ("/admin/**", "/%61dmin/x", True),
        ("/admin/**", "/x/../admin/y", True),
        ("/admin/**", "//admin//y", True),
        ("/admin/**", "/./admin", True),
        ("/a/*", "/a/b%2Fc", True),  # an encoded slash stays inside its segment
        ("/a/*/c", "/a/b%2Fc", False),
        # The query never takes part.
        ("/login", "/login?next=/admin", True),
    ],
)
def test_glob_examples(pattern: str, path: str, expected: bool) -> None:
    assert matches(pattern, split_target(path.encode()).path) is expected


@given(SEGMENTS, st.booleans())
def test_double_star_matches_any_depth(segments: list[str], trailing: bool) -> None:
    assert matches("/**", path_of(segments, trailing))
    assert matches("/root/**", path_of(["root", *segments], trailing))


@given(SEGMENTS, SEGMENTS, st.booleans(), st.booleans())
def test_trailing_slash_never_matters(pattern_segments: list[str], segments: list[str],
                                      pattern_slash: bool, path_slash: bool) -> None:
    pattern = path_of(pattern_segments, pattern_slash)
    assert matches(pattern, path_of(segments, path_slash)) == matches(pattern, path_of(segments))
    assert matches(pattern, path_of(segments)) == (pattern_segments == segments)


@given(SEGMENTS, SEGMENT)
def test_single_star_stays_in_one_segment(segments: list[str], extra: str) -> None:
    pattern = path_of([*segments, "*"])
    assert matches(pattern, path_of([*segments, extra]))
    assert not matches(pattern, path_of([*segments, extra, extra]))


@given(st.lists(SEGMENT, min_size=1, max_size=4), SEGMENTS)
def test_literal_prefix_with_double_star(prefix: list[str], rest: list[str]) -> None:
    assert matches(path_of(prefix) + "/**", path_of(prefix + rest))
    other = [prefix[0] + "x", *prefix[1:]]
    assert not matches(path_of(prefix) + "/**", path_of(other + rest))


@given(st.text(alphabet="/.%2Fa0-_", max_size=30))
@example("/a/./b/../../..//c/")
def test_normalized_paths_are_canonical(raw: str) -> None:
    path = normalize_path(raw)
    assert not path.endswith("/")
    assert "//" not in path
    assert all(segment not in (".", "..") for segment in path.split("/")[1:])
    assert path == "" or path.startswith("/")


def _resolved(path: str) -> str:
    """Dot segments resolved and empty ones dropped, step by step (no percent-escapes)."""
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            segments = segments[:-1]
        elif segment not in ("", "."):
            segments.append(segment)
    return "".join("/" + segment for segment in segments)


@given(st.text(alphabet="/.a-~", max_size=30))
@example("/jmap/session")
@example("/.well-known/x")
@example("/a/b.")
def test_paths_without_escapes_normalize_by_their_segments(raw: str) -> None:
    """Including the paths returned as they are (already normal), the usual case."""
    assert normalize_path(raw) == ("" if raw == "*" else _resolved(raw))


def test_first_match_wins() -> None:
    table = RouteTable([
        route("/auth/token", destination="new"),
        route("/auth/**", destination="old"),
        route("/**", extract=extract("authorization")),
    ])
    assert table.match(normalize_path("/auth/token")).index == 0
    assert table.match(normalize_path("/auth/token/")).index == 0
    assert table.match(normalize_path("/auth/other")).index == 1
    assert table.match(normalize_path("/jmap")).index == 2
    assert RouteTable([route("/only")]).match(normalize_path("/other")) is None


@functools.cache
def reference_match(glob: str, path: str) -> bool:
    """The glob rules read literally, by recursion (exponential in general, fine when short):
    ``/**`` before ``/`` or the end is nothing or ``/`` and anything, another ``**`` is
    anything, ``*`` is anything without ``/``, ``?`` one character that is not ``/``."""
    if not glob:
        return not path
    if glob.startswith("/**") and (len(glob) == 3 or glob[3] == "/"):
        return reference_match(glob[3:], path) or (path.startswith("/") and any(
            reference_match(glob[3:], path[cut:]) for cut in range(1, len(path) + 1)))
    if glob.startswith("**"):
        return any(reference_match(glob[2:], path[cut:]) for cut in range(len(path) + 1))
    if glob[0] == "*":
        return any(reference_match(glob[1:], path[cut:]) for cut in range(len(path) + 1)
                   if "/" not in path[:cut])
    if not path or not (path[0] == glob[0] or (glob[0] == "?" and path[0] != "/")):
        return False
    return reference_match(glob[1:], path[1:])


GLOB = st.text(alphabet="/ab*?.", max_size=12)


@given(GLOB, st.text(alphabet="/ab.\n", max_size=14))
@example("/a*/**", "/ab")
@example("/**/**", "x")
@example("**/*", "a/")
@example("/a**b/**", "/a/x/b")
@example("/*/*a?/**b", "/x/ya\n/b")
def test_glob_matcher_agrees_with_the_reference(glob: str, path: str) -> None:
    assert PathGlob(glob).matches(path) is reference_match(glob.rstrip("/"), path)


@given(GLOB, SEGMENTS)
def test_glob_matcher_agrees_with_the_reference_on_normalised_paths(
        glob: str, segments: list[str]) -> None:
    path = normalize_path(path_of(segments))
    assert PathGlob(glob).matches(path) is reference_match(glob.rstrip("/"), path)


#: Globs and paths that take a backtracking matcher cubic time or more; most also make any
#: matcher read the whole path.
ADVERSARIAL = [
    ("/a/**/b/**/c/**/d", lambda size: "/a" + "/b/c" * (size // 4)),
    ("/a/**/a/**/a/**/a/b", lambda size: "/a" * (size // 2)),
    ("/**/x/**/y", lambda size: "/y" * (size // 2)),
    ("/**/a/a/a/b/**", lambda size: "/a" * (size // 2)),
    ("/**/x?y/z*/w/**", lambda size: "/x1y/zq" * (size // 7)),
    ("/**/a/*/b/**", lambda size: "/a" * (size // 2)),
    ("/**/*/*/*/*/*/*/*/*/b/**", lambda size: "/a" * (size // 2)),
    ("/**/a*a*a*b*/**", lambda size: "/" + "a" * size),
    ("**a?a?a?a?b**", lambda size: "a" * size),
    ("**a**a**a**b", lambda size: "a/" * (size // 2)),
]


def test_adversarial_paths_take_linear_time() -> None:
    # The backtracking regex took 14.7 s of CPU for the first glob on a 6 KB path (and grew
    # as the cube of its length). A step counter cannot see inside the regex engine, so
    # this bounds CPU time, very generously: each match takes about 10 ms at 60 KB.
    for glob, make_path in ADVERSARIAL:
        compiled = PathGlob(glob)
        for size in (6_000, 60_000):
            path = make_path(size)
            started = time.process_time()
            assert not compiled.matches(path)
            assert time.process_time() - started < 0.5, (glob, size)


def test_the_issue_glob_still_matches_long_paths() -> None:
    path = "/a" + "/b/c" * 1500
    assert PathGlob("/a/**/b/**/c/**/d").matches(path + "/d")
    assert PathGlob("/a/**/b/**/c/**/d/**").matches(path + "/d" + path)
    assert not PathGlob("/a/**/b/**/c/**/d").matches(path + "/dx")


@pytest.mark.parametrize(
    ("target", "path", "query", "origin", "authority"),
    [
        (b"/a/b?x=1", "/a/b", "x=1", b"/a/b?x=1", None),
        (b"/a#frag", "/a", "", b"/a#frag", None),
        (b"http://mail.example.org/jmap?x", "/jmap", "x", b"/jmap?x", b"mail.example.org"),
        (b"https://user@h:8443", "/", "", b"/", b"h:8443"),
        (b"*", "*", "", b"*", None),
    ],
)
def test_split_target(target: bytes, path: str, query: str, origin: bytes,
                      authority: bytes | None) -> None:
    split = split_target(target)
    assert (split.path, split.query, split.origin, split.authority) == (
        path, query, origin, authority)


# --- identifier extraction ---------------------------------------------------------------------

LOGIN = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF,
                                       blacklist_characters=":"), min_size=1, max_size=40)
ADDRESS = st.builds(lambda user, domain: f"{user}@{domain}.example",
                    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._+-", min_size=1,
                            max_size=20),
                    st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: dict) -> str:
    return ".".join([b64url(b'{"alg":"none"}'), b64url(json.dumps(claims).encode()), "sig"])


@given(LOGIN, st.text(max_size=20), st.sampled_from(["Basic", "basic", "BASIC"]))
def test_basic_login_is_before_the_colon(login: str, password: str, scheme: str) -> None:
    assume(login.strip() == login)
    value = f"{scheme} {base64.b64encode(f'{login}:{password}'.encode()).decode()}"
    assert account_from_authorization(value.encode(), "email") == login


@given(ADDRESS, st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1,
                        max_size=30))
def test_bearer_stalwart_token(address: str, body: str) -> None:
    token = f"sw1.{body}.{b64url(address.encode())}"
    assert account_from_authorization(f"Bearer {token}".encode(), "email") == address


@given(ADDRESS, ADDRESS)
def test_bearer_jwt_claims_in_order(configured: str, other: str) -> None:
    token = jwt({"sub": "not-an-address", "upn": other, "mail": configured})
    assert account_from_authorization(f"Bearer {token}".encode(), "mail") == configured
    assert account_from_authorization(f"Bearer {token}".encode(), "email") == other


@pytest.mark.parametrize("value", [b"Basic !!!", b"Basic " + base64.b64encode(b"nocolon"),
                                   b"Bearer opaque-token", b"Digest username=x", b"", b"Bearer"])
def test_unreadable_authorization_names_nobody(value: bytes) -> None:
    assert account_from_authorization(value, "email") is None


@given(ADDRESS, st.text(max_size=30))
def test_query_parameter(address: str, noise: str) -> None:
    query = urlencode([("x", noise), ("account", address), ("account", "second@x")])
    found = extract_identifier(extract("query", param="account"), headers=[], query=query,
                               body=None)
    assert found == address


@given(ADDRESS)
def test_header(address: str) -> None:
    headers = [(b"Host", b"x"), (b"X-Account", f"  {address} ".encode())]
    assert extract_identifier(extract("header", header="x-account"), headers=headers, query="",
                              body=None) == address


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x24F,
                                      blacklist_characters="&"), min_size=1, max_size=30),
       st.text(max_size=50))
def test_body_is_form_decoded_before_the_regex(client_id: str, other: str) -> None:
    assume(client_id.strip() == client_id and "client_id" not in other)
    body = urlencode([("grant_type", other), ("client_id", client_id)]).encode()
    found = extract_identifier(extract("body", regex=r"client_id=([^&]+)"), headers=[],
                               query="", body=body)
    assert found == client_id


def test_body_without_match_or_body() -> None:
    config = extract("body", regex=r"client_id=([^&]+)")
    assert extract_identifier(config, headers=[], query="", body=b"grant_type=x") is None
    assert extract_identifier(config, headers=[], query="", body=None) is None
    assert extract_identifier(config, headers=[], query="",
                              body=b"client_id=" + quote("web ui").encode()) == "web ui"


# --- decisions ------------------------------------------------------------------------------------

OPTIONS = {"separators": ("%",), "normalize": "lowercase", "default_destination": "old"}


def only_route(**kwargs):
    return RouteTable([route("/**", **kwargs)]).routes[0]


def test_pinned_route_ignores_identifiers() -> None:
    decision = decide(only_route(destination="new"), "alice", **OPTIONS)
    assert (decision.destination, decision.identifier) == ("new", None)


def test_identifier_is_stripped_and_normalised() -> None:
    decision = decide(only_route(extract=extract("authorization")), "Alice%Admin", **OPTIONS)
    assert (decision.destination, decision.identifier) == (None, "alice")


@pytest.mark.parametrize("raw", [None, "bad id", 'quo"te', "tab\there", "x" * 600])
def test_no_usable_identifier_takes_the_fallback(raw: str | None) -> None:
    with_fallback = decide(only_route(extract=extract("authorization"), fallback="new"), raw,
                           **OPTIONS)
    assert (with_fallback.destination, with_fallback.reason) == ("new", "fallback")
    without = decide(only_route(extract=extract("authorization")), raw, **OPTIONS)
    assert (without.destination, without.reason) == ("old", "default")
