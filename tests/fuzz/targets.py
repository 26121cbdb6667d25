"""Fuzz targets for every sans-IO parser: one function per target, ``target(data: bytes)``.

Each target turns arbitrary bytes into a run of one parser (the first bytes choose settings
and how the input is cut into chunks, the rest is the input) and checks the parser's
invariants. A target returns normally when the parser behaved; it raises when it did not:
an exception outside the parser's declared error set, or an ``AssertionError`` for a broken
invariant (unbounded buffer, reply without CRLF, CR/LF smuggled into a line, …). The same
functions run under atheris (``scripts/fuzz``, millions of inputs) and hypothesis
(``tests/fuzz/test_targets.py``, in CI). The protocol machines' targets live in
``tests/fuzz/protocol_targets.py``, the shared input reading and invariants in
``tests/fuzz/harness.py``.
"""

from __future__ import annotations

import base64
import copy
import datetime
import io
import json
import math
import re
import struct
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h11
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from stalroute.admin.bulk import (
    FORMATS,
    BadRow,
    BulkFormatError,
    Row,
    detect_format,
    read_records,
)
from stalroute.channel import CallFailed, Channel, ChannelClosed
from stalroute.cluster import Ack, BadMessage, Change, decode_message, encode, encode_ack
from stalroute.config import ConfigError, HTTPExtractConfig, HTTPRouteConfig, parse_config
from stalroute.http.headers import (
    Forwarding,
    backend_request_headers,
    check_partial_head,
    check_request_head,
    client_response_headers,
    find_head_end,
)
from stalroute.http.routes import (
    MAX_RAW_IDENTIFIER,
    PathGlob,
    RouteTable,
    account_from_authorization,
    decide,
    extract_identifier,
    normalize_path,
    split_target,
)
from stalroute.http.wire import (
    END, NEED_DATA, PAUSED, Body, RequestHead, RequestReader, WireError,
)
from stalroute.identity import (
    MAX_IDENTIFIER_LENGTH,
    InvalidIdentifier,
    account_from_credentials,
    account_from_token,
    routing_identifier,
)
from stalroute.mapping.file import MappingFileError, parse_mapping_lines
from stalroute.membership import BadAnnounce, Member, encode_announce
from stalroute.proxyproto import (
    V1_MAX_LENGTH,
    V1_PREFIX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    parse_tlvs,
)
from stalroute.sasl import (
    MECHANISMS,
    Challenge,
    Credentials,
    SASLError,
    SASLExchange,
    decode_base64,
    decode_oauthbearer,
    decode_plain,
    decode_xoauth2,
)
from stalroute.sqlparams import ENGINES, parameter_problem
from stalroute.sqlparams import translate as sql_translate
from stalroute.tls_layer import RecordBoundaries
from tests.fuzz.harness import Input, check_credentials, chunks
from tests.fuzz import protocol_targets

REPO = Path(__file__).resolve().parents[2]


# --- PROXY protocol ---------------------------------------------------------------------------


def fuzz_proxyproto(data: bytes) -> None:
    """v1/v2 header decoder: only ProxyHeaderError; split-independent; bounded buffer."""
    inp = Input(data)
    prefix = inp.choice([b"", V1_PREFIX, V2_SIGNATURE, V2_SIGNATURE + b"\x21\x11",
                         V2_SIGNATURE + b"\x21\x21", V2_SIGNATURE + b"\x20"])
    max_v2 = inp.choice([0, 12, 64, 4096])
    pieces = chunks(Input(data[::-1]), prefix + inp.rest())
    payload = b"".join(pieces)
    outcomes = []
    for pieces in ([payload], pieces):
        parser = ProxyHeaderParser(max_v2_length=max_v2)
        outcome: object = None
        try:
            for piece in pieces:
                outcome = parser.feed(piece)
                assert len(parser._buffer) <= max(V1_MAX_LENGTH, 16 + max_v2)
        except ProxyHeaderError as exc:
            outcome = type(exc)
        if isinstance(outcome, ProxyHeader):
            header = outcome
            assert header.version in (1, 2) and header.command in ("PROXY", "LOCAL")
            for address in (header.source, header.destination):
                assert address is None or 0 <= address[1] <= 65535
            consumed = len(payload) - len(parser.rest)
            assert payload[consumed:] == parser.rest
        outcomes.append((outcome, parser.rest if not isinstance(outcome, type) else None))
    assert outcomes[0] == outcomes[1]
    try:
        for kind, value in parse_tlvs(payload):
            assert 0 <= kind <= 255 and len(value) <= len(payload)
    except ProxyHeaderError:
        pass


def fuzz_tls_records(data: bytes) -> None:
    """The TLS layer's record cutter, over reads of any size: the pieces join up to each read
    and every piece but a read's last ends where a record ends (a walk over the headers of
    the whole stream says where)."""
    reads = chunks(Input(data[::-1]), data)
    stream = b"".join(reads)
    ends, position = set(), 0
    while position + 5 <= len(stream):
        position += 5 + int.from_bytes(stream[position + 3:position + 5], "big")
        ends.add(position)
    cutter, position = RecordBoundaries(), 0
    for read in reads:
        pieces = cutter.cut(read)
        assert b"".join(pieces) == read
        for number, piece in enumerate(pieces, 1):
            position += len(piece)
            assert number == len(pieces) or position in ends, (position, sorted(ends))
        assert not pieces or (position in ends) != cutter.mid_record, (position, sorted(ends))


# --- SASL and identities ----------------------------------------------------------------------

def fuzz_sasl(data: bytes) -> None:
    """Decoders and the exchange: only SASLError; credentials well-typed."""
    inp = Input(data)
    raw = inp.sized(255)
    for decode in (decode_plain, decode_oauthbearer, decode_xoauth2):
        try:
            check_credentials(decode(raw))
        except SASLError:
            pass
    try:
        decode_base64(raw)
    except SASLError:
        pass
    mechanism = inp.choice([*MECHANISMS, "plain", "CRAM-MD5", ""])
    initial = inp.choice([None, b"=", b"", raw, base64.b64encode(raw)])
    lines = inp.rest().split(b"\n")
    try:
        exchange = SASLExchange(mechanism, initial)
        result = exchange.step()
        for line in lines:
            if not isinstance(result, Challenge):
                break
            assert b"\r" not in result.text and b"\n" not in result.text
            if line[:1] == b"\x00":
                line = base64.b64encode(line[1:])
            result = exchange.step(line)
        if not isinstance(result, Challenge):
            check_credentials(result)
    except SASLError:
        pass


def fuzz_identity(data: bytes) -> None:
    """Token/JWT extraction and identifier validation: only InvalidIdentifier."""
    inp = Input(data)
    claim = inp.choice(["email", "sub", "upn", "preferred_username"])
    separators = inp.subset(["%", "*", "+", "#", ""])
    normalize = inp.choice(["lowercase", "none"])
    text = inp.rest().decode("utf-8", "surrogateescape")
    if inp.flag():
        text = inp.choice(["sw1.", "eyJ4IjoxfQ.", ""]) + text
    for token in (text, ".".join(base64.urlsafe_b64encode(part.encode("utf-8", "surrogatepass"))
                                 .decode().rstrip("=") for part in text.split(".", 2))):
        account = account_from_token(token, claim)
        assert account is None or isinstance(account, str)
        for mechanism in ("PLAIN", "OAUTHBEARER", "XOAUTH2"):
            login = account_from_credentials(
                Credentials(mechanism, b"", login=text or None, token=token or None), claim)
            assert login is None or isinstance(login, str)
    try:
        identifier = routing_identifier(text, separators, normalize)
    except InvalidIdentifier:
        return
    assert 0 < len(identifier) <= MAX_IDENTIFIER_LENGTH
    assert not any(char.isspace() or char in "\"'\\" for char in identifier)
    assert identifier.isprintable()


# --- HTTP --------------------------------------------------------------------------------------


def fuzz_http_target(data: bytes) -> None:
    """Target split, path normalisation and glob matching: no exception; canonical paths;
    globs agree with a plain recursive reading on short inputs."""
    from tests.unit.test_http_routes import reference_match

    inp = Input(data)
    glob = inp.sized(24).decode("latin-1")
    target = inp.rest()
    split = split_target(target)
    assert split.origin.startswith(b"/") or split.origin == target
    path = normalize_path(split.path)
    assert not path.endswith("/") and "//" not in path
    assert all(segment not in (".", "..") for segment in path.split("/")[1:])
    matched = PathGlob(glob).matches(path)
    if len(glob) <= 10 and len(path) <= 12:
        assert matched is reference_match(glob.rstrip("/"), path)
    table = RouteTable([HTTPRouteConfig(match=glob, destination="a"),
                        HTTPRouteConfig(match="/**", destination="b")])
    route = table.match(path)
    assert route is not None and (route.index == 0) is matched


def fuzz_http_extract(data: bytes) -> None:
    """Identifier extraction (Authorization, header, query, body) and the decision."""
    inp = Input(data)
    source = inp.choice(["authorization", "header", "query", "body"])
    extract = HTTPExtractConfig(from_=source, header="x-account", param="account",
                                regex=re.compile(r"(?:^|&)user=([^&]*)") if source == "body"
                                else None)
    value = inp.sized(255)
    prefix = inp.choice([b"Basic ", b"Bearer ", b"bearer  ", b""])
    if inp.flag():
        value = base64.b64encode(value)
    headers = [(b"Authorization", prefix + value), (b"X-Account", value)]
    rest = inp.rest()
    found = extract_identifier(extract, headers=headers, query=rest.decode("latin-1"),
                               body=rest, jwt_username_claim="email")
    assert found is None or (isinstance(found, str) and 0 < len(found) <= MAX_RAW_IDENTIFIER)
    account = account_from_authorization(prefix + value, "email")
    assert account is None or isinstance(account, str)
    route = RouteTable([HTTPRouteConfig(match="/**", extract=extract, fallback="b")]).routes[0]
    decision = decide(route, found, separators=("%",), normalize="lowercase",
                      default_destination="a")
    assert (decision.destination is None) != (decision.identifier is None)


_HEAD_START = [b"", b"GET / HTTP/1.1\r\nHost: x\r\n", b"POST /a HTTP/1.0\r\n",
               b"GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"]


def fuzz_http_head(data: bytes) -> None:
    """Request-head checks: no exception; a head they pass is one h11 reads as a request,
    and the headers stalroute rewrites carry no CR, LF or NUL."""
    inp = Input(data)
    buffer = inp.choice(_HEAD_START) + inp.rest()
    problem = check_partial_head(buffer, 65536, inp.byte() % (len(buffer) + 1))
    assert problem is None or problem.status in (400, 431)
    end = find_head_end(buffer)
    if end is None:
        return
    head = buffer[:end]
    problem = check_request_head(head)
    if problem is not None:
        assert problem.status in (400, 501, 505)
        return
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(head)
    try:
        event = connection.next_event()
    except h11.RemoteProtocolError:
        return
    assert isinstance(event, h11.Request), event
    headers = list(event.headers)
    forwarding = Forwarding(client_ip="2001:db8::1", proto="https", trust=True, append=True)
    for rewritten in (backend_request_headers(headers, forwarding, websocket=True, chunked=True,
                                              host=event.headers[0][1] if headers else None),
                      client_response_headers(headers, switching=False, close=True)):
        for name, value in rewritten:
            assert not re.search(rb"[\r\n\x00]", name + value), (name, value)


_WIRE_START = [b"", b"GET / HTTP/1.1\r\nHost: x\r\n",
               b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
               b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n",
               b"PUT /x HTTP/1.0\r\nContent-Length: 2\r\n"]
#: h11's complaints about a message's framing: where it and we disagree on these, a message
#: would end at different places (a smuggling gap); we must never accept what it refuses so.
_FRAMING_WORDS = ("content-length", "transfer-encoding", "chunk")


def _wire_first(pieces: list[bytes]) -> tuple[Any, ...]:
    """The first request the client leg's reader finds in ``pieces``: ``("ok", head, body,
    rest)``, ``("error", status)`` or ``("incomplete",)``."""
    reader = RequestReader(65536)
    head: tuple[Any, ...] | None = None
    body = b""
    fed = 0
    for piece in pieces:
        reader.receive(piece)
        fed += 1
        while True:
            try:
                event = reader.next_event()
            except WireError as exc:
                assert exc.status in (400, 431, 501, 505), exc.status
                return ("error", exc.status)
            if isinstance(event, RequestHead):
                # h11 lowercases names, and the value of Transfer-Encoding.
                head = (event.method, event.target,
                        tuple((n.lower(), v.lower() if n.lower() == b"transfer-encoding" else v)
                              for n, v in event.headers),
                        event.http_version, event.chunked, event.content_length)
            elif isinstance(event, Body):
                assert event.data
                body += event.data
            elif event is END:
                continue
            elif event is PAUSED or (event is NEED_DATA and reader.done):
                break
            else:
                assert event is NEED_DATA, event
                break
        if reader.done:
            break
    if not reader.done:
        return ("incomplete",)
    return ("ok", head, body, reader.leftover() + b"".join(pieces[fed:]))


def _h11_first(payload: bytes) -> tuple[Any, ...]:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(payload)
    head: tuple[Any, ...] | None = None
    body = b""
    try:
        while True:
            event = connection.next_event()
            if isinstance(event, h11.Request):
                head = (event.method, event.target, tuple(event.headers), event.http_version)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return ("ok", head, body, connection.trailing_data[0])
            else:
                return ("incomplete",)
    except h11.RemoteProtocolError as exc:
        return ("error", str(exc), head, body)


def fuzz_http_wire(data: bytes) -> None:
    """Differential: the client leg's :class:`RequestReader` (head check, llhttp, our body
    framing) against h11 on the same bytes. Same result however the bytes are split; where
    both read the first request whole, the same method, target, headers and body, and the
    same bytes left for the next request; where we read it and h11 does not, h11's complaint
    is not about the framing (a head h11 refuses for another reason: a method llhttp knows
    and h11 does not, say) or only about trailers we drop, after the same body."""
    inp = Input(data)
    pieces = chunks(Input(data[::-1]), inp.choice(_WIRE_START) + inp.rest(), 65536)
    payload = b"".join(pieces)
    ours = _wire_first([payload])
    split = _wire_first(pieces)
    # Refused either way (a head too large may be seen malformed first when cut).
    assert split == ours or split[0] == ours[0] == "error", (split, ours)
    theirs = _h11_first(payload)
    if ours[0] == "ok":
        assert theirs[0] != "incomplete", (ours, theirs)  # h11 would read on: another end
        if theirs[0] == "ok":
            method, target, headers, version = ours[1][:4]
            assert (method, target, headers, version) == theirs[1], (ours, theirs)
            assert ours[2:] == theirs[2:], (ours, theirs)
        else:
            reason, their_head, their_body = theirs[1:]
            if their_head is None:  # refused at the head
                assert not any(word in reason.lower() for word in _FRAMING_WORDS), (
                    ours, theirs)
            else:  # refused in the body: only in the trailers, after the same body
                assert their_body == ours[2] and ours[1][4], (ours, theirs)
    elif theirs[0] == "ok":
        assert ours[0] == "error", (ours, theirs)  # never still reading where h11 ended


# --- files and bodies ---------------------------------------------------------------------------


def fuzz_mapping_file(data: bytes) -> None:
    """The mapping file's line parser: only MappingFileError; every entry valid."""
    inp = Input(data)
    normalize = inp.choice(["lowercase", "none"])
    text = inp.rest().decode("utf-8", "surrogateescape")
    destinations = ("main", "new", "ü")
    try:
        table = parse_mapping_lines(text.splitlines(), destinations, normalize, Path("fuzz.tsv"))
    except MappingFileError as exc:
        assert 0 < len(exc.problems) <= 21
        return
    for identifier, destination in table.items():
        assert destination in destinations
        assert routing_identifier(identifier, (), normalize) == identifier


def fuzz_bulk_import(data: bytes) -> None:
    """``POST /mappings/import`` body readers: only BulkFormatError (or ValueError for an
    explicit bad format); rows carry strings and line numbers."""
    inp = Input(data)
    explicit = inp.choice([None, "tsv", "json", "xml"])
    content_type = inp.choice([None, "application/json", "text/tab-separated-values", "x/y"])
    body = inp.rest()
    try:
        fmt = detect_format(explicit, content_type, body[:64])
    except ValueError:
        assert explicit not in FORMATS
        return
    try:
        for record in read_records(io.BytesIO(body), fmt):
            assert isinstance(record, (Row, BadRow)) and record.line >= 1
            if isinstance(record, Row):
                assert isinstance(record.identifier, str) and isinstance(record.destination, str)
    except BulkFormatError as exc:
        assert exc.line >= 1


# --- configuration --------------------------------------------------------------------------------

_CONFIG_FILES = [REPO / "etc" / "stalroute.toml",
                 *sorted((REPO / "etc" / "examples").glob("*.toml"))]


def _leaf_paths(table: dict, prefix: tuple = ()) -> Iterator[tuple]:
    for key, value in table.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _leaf_paths(value, (*prefix, key))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for index, item in enumerate(value):
                yield from _leaf_paths(item, (*prefix, key, index))


_SEEDS = [tomllib.loads(path.read_text()) for path in _CONFIG_FILES]
_SEED_PATHS = [list(_leaf_paths(seed)) for seed in _SEEDS]


def _toml_value(inp: Input, depth: int = 0) -> Any:
    kind = inp.byte() % (12 if depth < 2 else 9)
    text = inp.sized(24).decode("utf-8", "replace")
    if kind == 0:
        return text
    if kind == 1:
        return int.from_bytes(inp.take(inp.byte() % 12), "big", signed=True)
    if kind == 2:
        return inp.choice([0.0, -1.5, 1e308, math.inf, -math.inf, math.nan, 0.001])
    if kind == 3:
        return inp.flag()
    if kind == 4:
        return inp.choice(["1s", "0s", "10m", "-5s", "5x", "1h", "99999999999d", "10", ""])
    if kind == 5:
        return inp.choice(["127.0.0.1:1", "[::1]:0", "0.0.0.0:65536", "10.0.0.0/8", "::/0",
                           "host:25", "imap", "pop3", "submission", "smtp", "lmtp", "http",
                           "managesieve", "implicit", "starttls", "plain", "file", "sql",
                           "redis", "sqlite", "main", "default", "/**", "${NOPE}"])
    if kind == 6:
        return datetime.date(2026, 1, 1 + inp.byte() % 28)
    if kind == 7:
        return datetime.time(inp.byte() % 24)
    if kind == 8:
        return -inp.byte()
    if kind == 9:
        return [_toml_value(inp, depth + 1) for _ in range(inp.byte() % 4)]
    if kind == 10:
        return {text or "k": _toml_value(inp, depth + 1) for _ in range(inp.byte() % 3)}
    return [{"match": text, "destination": "main"}]


def _mutate(document: dict, path: tuple, value: Any, delete: bool) -> None:
    table: Any = document
    for key in path[:-1]:
        table = table[key]
    if delete:
        del table[path[-1]]
    else:
        table[path[-1]] = value


def fuzz_config(data: bytes) -> None:
    """parse_config on shipped configurations with random values put in: only ConfigError."""
    inp = Input(data)
    seed = inp.byte() % len(_SEEDS)
    document = copy.deepcopy(_SEEDS[seed])
    paths = _SEED_PATHS[seed]
    for _ in range(1 + inp.byte() % 4):
        path = paths[inp.number(len(paths))]
        action = inp.byte() % 8
        if action == 7:
            path = (*path[:-1], inp.sized(12).decode("utf-8", "replace") or "x")
        try:
            _mutate(document, path, _toml_value(inp), delete=action == 6)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced a table on this path
    try:
        config = parse_config(document, Path("/nonexistent"), {}, check_files=False)
    except ConfigError as exc:
        assert exc.problems and all(str(problem) for problem in exc.problems)
        return
    assert config.listeners is not None


# --- the cluster bus -------------------------------------------------------------------------

#: One message of each kind a bus carries, for the mutations to start from.
_BUS_MESSAGES = [
    encode(Change(1, "0123456789abcdef", 7, "delay", {"identifier": "alice", "seconds": 2.5})),
    encode(Change(1, "0123456789abcdef", 8, "kick", {"identifier": None, "destination": "n"})),
    encode_ack(Ack(2, "fedcba9876543210", "0123456789abcdef", 7)),
    encode_announce(Member(3, "00112233", 1.5e9, "mx.test", "1.0", 2,
                           ({"name": "imaps", "protocol": "imap", "bind": ["[::]:993"]},),
                           ("main",), "ab" * 32)),
]


def _json_value(inp: Input, depth: int = 0) -> Any:
    kind = inp.byte() % (8 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return inp.flag()
    if kind == 2:
        return int.from_bytes(inp.take(inp.byte() % 10), "big", signed=True)
    if kind == 3:
        return inp.choice([0.0, -1.5, 2.5, 1e308, 1e-320])
    if kind == 4:
        return inp.sized(24).decode("utf-8", "replace")
    if kind == 5:
        return inp.choice(["announce", "ack", "delay", "kick", "", "0123456789abcdef", "x" * 65])
    if kind == 6:
        return [_json_value(inp, depth + 1) for _ in range(inp.byte() % 4)]
    return {inp.sized(8).decode("utf-8", "replace"): _json_value(inp, depth + 1)
            for _ in range(inp.byte() % 3)}


def fuzz_cluster_message(data: bytes) -> None:
    """The bus message decoder (changes, acks, announces), on raw bytes or on a well-formed
    message with fields replaced, added or removed: only BadMessage or BadAnnounce; what it
    accepts encodes back to the same."""
    inp = Input(data)
    if inp.flag():
        message: str | bytes = inp.rest()
    else:
        document = json.loads(inp.choice(_BUS_MESSAGES))
        for _ in range(1 + inp.byte() % 3):
            key = inp.choice([*document, inp.sized(8).decode("utf-8", "replace")])
            if inp.byte() % 4 == 0:
                document.pop(key, None)
            else:
                document[key] = _json_value(inp)
        message = json.dumps(document)
    try:
        decoded = decode_message(message)
    except (BadMessage, BadAnnounce):
        return
    if isinstance(decoded, Change):
        assert decoded.op != "ack" and decode_message(encode(decoded)) == decoded
    elif isinstance(decoded, Ack):
        assert decode_message(encode_ack(decoded)) == decoded
    else:
        assert decode_message(encode_announce(decoded)) == decoded


# --- the supervisor–worker channel -----------------------------------------------------------

#: The channel's longest message in the target, so that over-long ones are within reach.
_CHANNEL_LIMIT = 512
#: One message of each kind the channel carries: calls of the handlers below, answers to the
#: target's own calls (1 is waiting, 2 was cancelled), an event.
_CHANNEL_MESSAGES: list[dict[str, Any]] = [
    {"id": 1, "call": "apply", "args": {"op": "kick", "args": {"identifier": "alice"}}},
    {"id": 2, "call": "report", "args": {}},
    {"id": 3, "call": "reload"},
    {"id": 1, "result": {"stats": {"bans": 0}, "worker": 1}},
    {"id": 2, "error": "no such destination"},
    {"event": "log", "namespace": "stalroute.workers", "level": "info", "text": "serving",
     "fields": {"worker": 1}},
]


def _channel_frames(inp: Input) -> bytes:
    """Frames of well-formed messages with fields replaced, added or removed; now and then a
    frame of raw bytes or a length over the limit."""
    frames = []
    for _ in range(1 + inp.byte() % 6):
        kind = inp.byte() % 8
        if kind == 0:
            frames.append(struct.pack("!I", _CHANNEL_LIMIT + 1 + inp.number(1 << 16)))
            continue
        if kind == 1:
            payload = inp.sized(80)
        else:
            message = copy.deepcopy(inp.choice(_CHANNEL_MESSAGES))
            for _ in range(inp.byte() % 3):
                key = inp.choice([*message, "id", "call", "args", "result", "error", "event",
                                  inp.sized(8).decode("utf-8", "replace")])
                if inp.byte() % 4 == 0:
                    message.pop(key, None)
                else:
                    message[key] = _json_value(inp)
            payload = json.dumps(message).encode()
        frames.append(struct.pack("!I", len(payload)) + payload)
    return b"".join(frames)


def _written_messages(data: bytes) -> list[dict[str, Any]]:
    """What a channel wrote: whole frames, each a JSON object."""
    messages = []
    while data:
        (length,) = struct.unpack("!I", data[:4])
        assert len(data) >= 4 + length
        message = json.loads(data[4:4 + length])
        assert isinstance(message, dict)
        messages.append(message)
        data = data[4 + length:]
    return messages


def _channel_run(pieces: list[bytes]) -> tuple[bytes, list[str], list[str]]:
    """A channel that made two calls (the second then cancelled, as by a timeout), fed
    ``pieces``, then lost: what it wrote, what it handled and how its calls settled."""
    transport = StringTransport()
    handled: list[str] = []  # what the handlers were called for, "!" once closing
    late: Deferred[int] = Deferred()

    def handler(name: str) -> Callable[..., Any]:
        def handle(**args: Any) -> Any:
            handled.append(name + "!" * transport.disconnecting)
            if name == "apply":
                return len(args["op"]) + len(args["args"])  # garbage arguments raise
            return late if name == "reload" else {"stats": [1]}
        return handle

    def on_event(message: dict[str, Any]) -> None:
        handled.append("event" + "!" * transport.disconnecting)

    lost: list[None] = []
    channel = Channel({name: handler(name) for name in ("apply", "report", "reload")},
                      on_event, lambda: lost.append(None))
    channel.MAX_LENGTH = _CHANNEL_LIMIT
    channel.makeConnection(transport)
    outcomes: list[list[Any]] = [[], []]
    calls = [channel.call("report"), channel.call("report")]
    for call, outcome in zip(calls, outcomes):
        call.addBoth(outcome.append)
    calls[1].cancel()
    for piece in pieces:
        channel.dataReceived(piece)
    late.callback(1)  # "reload" answers late, perhaps once the channel is closing
    channel.connectionLost(Failure(ConnectionDone()))
    assert len(lost) == 1
    settled = []
    for outcome in outcomes:
        [value] = outcome  # each call settled exactly once
        if isinstance(value, Failure):
            assert value.check(CallFailed, ChannelClosed, CancelledError), value
            settled.append(f"{type(value.value).__name__}: {value.getErrorMessage()}")
        else:
            settled.append(json.dumps(value))
    assert not any(what.endswith("!") for what in handled), handled
    written = _written_messages(transport.value())
    assert [message.get("call") for message in written[:2]] == ["report", "report"]
    for answer in written[2:]:
        assert len(answer) == 2 and "id" in answer and ("result" in answer or "error" in answer)
    return transport.value(), handled, settled


def fuzz_channel(data: bytes) -> None:
    """The supervisor–worker channel fed framed JSON (calls, answers, events with fields
    replaced, added or removed), or raw bytes, cut anywhere: nothing raises out of
    ``dataReceived``; what it cannot read (not a JSON object, too long) closes it, and nothing
    is handled after; handlers given garbage fail their call only; every call settles once;
    the same run however the bytes are cut."""
    inp = Input(data)
    payload = inp.rest() if inp.flag() else _channel_frames(inp)
    pieces = chunks(Input(data[::-1]), payload, _CHANNEL_LIMIT)
    assert _channel_run([b"".join(pieces)]) == _channel_run(pieces)


# --- SQL placeholders -------------------------------------------------------------------------

#: What SQL statements are made of, as far as placeholders care: an input flag spells the
#: payload in these characters only, so most inputs nest quotes, comments and placeholders.
_SQL_ALPHABET = "'\"$?%-/*\nEe_x1 0\\2("


def _sql_quoted_end(sql: str, start: int, backslash: bool) -> int | None:
    """Index after the string or identifier opened by the quote at ``start`` (a doubled
    quote, or with ``backslash`` a backslash and any character, is inside); None if it is
    never closed."""
    quote, index = sql[start], start + 1
    while index < len(sql):
        if backslash and sql[index] == "\\":
            if index + 1 == len(sql):
                return None
            index += 2
        elif sql[index] == quote:
            if sql[index + 1:index + 2] != quote:
                return index + 1
            index += 2
        else:
            index += 1
    return None


def reference_sql_reading(sql: str, engine: str) -> tuple[str, list[tuple[int, str]], int]:
    """A character-by-character reading of ``sql`` as :func:`stalroute.sqlparams.translate`
    documents it: the translated text, the placeholders as (number, written), and how far it
    read. It stops at a string, E-string or quoted identifier that is never closed (what
    follows is no SQL a driver accepts, and the module's regex then backtracks), so the
    result is only a prefix of the module's reading when that is short of ``len(sql)``."""
    sqlite, out, found = engine == "sqlite", [], []
    ident = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
    index = 0

    def text(piece: str) -> None:
        out.append(piece if sqlite else piece.replace("%", "%%"))

    def number(digits: str) -> int:
        return int(digits) if len(digits) <= 6 else 10**6

    def digits_end(start: int) -> int:
        while start < len(sql) and "0" <= sql[start] <= "9":
            start += 1
        return start

    while index < len(sql):
        char, end = sql[index], None
        after = sql[index + 1:index + 2]
        before = sql[index - 1] if index else ""
        if char in "Ee" and after == "'" and not (before.isalnum() or before in ("_", "$")):
            end = _sql_quoted_end(sql, index + 1, backslash=True)
            if end is None:
                break
        elif char in "'\"":
            end = _sql_quoted_end(sql, index, backslash=False)
            if end is None:
                break
        elif char == "-" and after == "-":
            newline = sql.find("\n", index)
            end = len(sql) if newline < 0 else newline
        elif char == "/" and after == "*":
            close = sql.find("*/", index + 2)
            end = None if close < 0 else close + 2
        elif char == "$":
            tag_end = index + 1
            if tag_end < len(sql) and sql[tag_end] in ident:
                while tag_end < len(sql) and (sql[tag_end] in ident or "0" <= sql[tag_end] <= "9"):
                    tag_end += 1
            if sql[tag_end:tag_end + 1] == "$":
                close = sql.find(sql[index:tag_end + 1], tag_end + 1)
                end = None if close < 0 else close + tag_end + 1 - index
        if end is not None:  # skipped: strings, identifiers, comments, dollar quotes
            text(sql[index:end])
            index = end
            continue
        if char == "$" and digits_end(index + 1) > index + 1 or char == "?" and sqlite:
            end = digits_end(index + 1)
            written = sql[index:end]
            value = (number(written[1:]) if len(written) > 1
                     else max((n for n, _ in found), default=0) + 1)
            found.append((value, written))
            out.append(f"?{value}" if sqlite else f"%(p{value})s")
            index = end
            continue
        if char == "?":  # PostgreSQL: an operator, with the digits that follow it
            end = digits_end(index + 1)
            text(sql[index:end])
            index = end
            continue
        text(char)
        index += 1
    return "".join(out), found, index


def fuzz_sqlparams(data: bytes) -> None:
    """``[mapping.sql]`` placeholder translation: only ValueError for an unknown engine;
    the placeholders and text agree with a character-by-character reference reading;
    psycopg2 sees exactly those parameters (every other ``%`` doubled); the validator
    accepts a statement exactly when it uses every parameter and no other."""
    inp = Input(data)
    settings = inp.byte()
    engine = ENGINES[settings & 1]
    names = ["identifier", "destination"][:(settings >> 1) % 3]
    payload = inp.rest()
    if settings == 255:
        try:
            sql_translate(payload.decode("latin-1"), "mysql")
        except ValueError:
            return
        raise AssertionError("an unknown engine was accepted")
    if settings & 0x40:
        sql = "".join(_SQL_ALPHABET[byte % len(_SQL_ALPHABET)] for byte in payload)
    else:
        sql = payload.decode("utf-8", "surrogateescape")
    text, placeholders = sql_translate(sql, engine)
    read = [(p.number, p.written) for p in placeholders]
    expected_text, expected, stop = reference_sql_reading(sql, engine)
    if stop == len(sql):
        assert (text, read) == (expected_text, expected), (sql, text, read, expected_text)
    else:
        assert text.startswith(expected_text) and read[:len(expected)] == expected, sql
    if engine == "postgresql":  # psycopg2's reading of pyformat: %%, %(name)s, nothing else
        tokens = re.findall(r"%%|%\(p([0-9]+)\)s|(%)", text)
        assert not any(lone for _, lone in tokens), text
        assert [int(n) for n, _ in tokens if n] == [n for n, _ in read], text
    wanted = set(range(1, len(names) + 1))
    problem = parameter_problem(sql, engine, names)
    assert (problem is None) == ({n for n, _ in read} == wanted), (sql, names, problem)
    assert problem is None or "\n" not in problem


_PREAUTH_SETTINGS = bytes([0, 0, 1, 0, 0, 0]) + bytes(8) + b"\x01"
_BACKEND_SETTINGS = bytes([0, 1, 0, 0, 0]) + bytes(8)
#: Starting inputs for atheris: typical sessions, so mutations begin deep in each parser.
SEEDS: dict[str, list[bytes]] = {
    "proxyproto": [b"\x01\x03" + b"TCP4 192.0.2.1 192.0.2.2 51000 993\r\nA1 LOGIN",
                   b"\x02\x03\x00\x0c" + bytes(range(12)) + b"x"],
    "preauth_imap": [_PREAUTH_SETTINGS + b"a CAPABILITY\r\nb ID NIL\r\nc LOGIN {5}\r\nalice "
                     b"{6+}\r\nsecret\r\nd AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n"],
    "preauth_pop3": [_PREAUTH_SETTINGS + b"CAPA\r\nUSER alice\r\nPASS secret\r\n"
                     b"AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nSTLS\r\n"],
    "preauth_managesieve": [_PREAUTH_SETTINGS + b'CAPABILITY\r\nAUTHENTICATE "PLAIN" {20+}\r\n'
                            b'AGFsaWNlAHNlY3JldA==\r\nSTARTTLS\r\nLOGOUT\r\n'],
    "preauth_submission": [_PREAUTH_SETTINGS + b"EHLO c.example\r\nAUTH LOGIN\r\nYWxpY2U=\r\n"
                           b"c2VjcmV0\r\nSTARTTLS\r\nMAIL FROM:<a@b>\r\nQUIT\r\n"],
    "backend_imap": [_BACKEND_SETTINGS + b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID "
                     b"STARTTLS] ready\r\n* ID NIL\r\nSRx1 OK done\r\n"
                     b"SRx2 OK [CAPABILITY IMAP4rev1] Logged in\r\n"],
    "backend_pop3": [_BACKEND_SETTINGS + b"+OK [XCLIENT] ready\r\n+OK\r\n+OK\r\nSASL PLAIN\r\n"
                     b"STLS\r\n.\r\n+OK Logged in.\r\n"],
    "backend_managesieve": [_BACKEND_SETTINGS + b'"IMPLEMENTATION" "Dovecot"\r\n"SIEVE" '
                            b'"fileinto"\r\n"NOTIFY" "mailto"\r\n"SASL" "PLAIN"\r\n"XCLIENT"'
                            b'\r\n"VERSION" "1.0"\r\nOK "ready"\r\nOK\r\nOK "Logged in."\r\n'],
    "backend_submission": [_BACKEND_SETTINGS + b"220 mx ESMTP\r\n250-mx\r\n250-AUTH PLAIN LOGIN"
                           b"\r\n250 XCLIENT ADDR PORT HELO\r\n220 mx again\r\n250-mx\r\n"
                           b"250 AUTH PLAIN\r\n334 \r\n235 2.7.0 ok\r\n"],
    "backend_smtp_passthrough": [_BACKEND_SETTINGS + b"220 mx ESMTP\r\n250-mx\r\n"
                                 b"250 XCLIENT ADDR PORT DESTADDR HELO\r\n220 again\r\n"],
    "backend_lmtp_passthrough": [_BACKEND_SETTINGS + b"220 lmtp\r\n250-lmtp\r\n"
                                 b"250 XCLIENT ADDR PORT\r\n220 again\r\n"],
    "http_head": [b"\x00GET /jmap HTTP/1.1\r\nHost: mx\r\nTransfer-Encoding: chunked\r\n"
                  b"Connection: keep-alive, x-a\r\nForwarded: for=1.2.3.4\r\n\r\n"],
    "http_wire": [b"\x00POST /jmap HTTP/1.1\r\nHost: mx\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
                  b"\x03abc"],
    "http_target": [b"\x07/a/**/b" + b"http://h:1/a/%2e%2E/b/./c%2F?x#y"],
    "http_extract": [b"\x00\x0bYWxpY2U6cHc=\x00\x00account=bob&user=carol"],
    "bulk_import": [b"\x00\x00" + b'[{"identifier": "a@b", "destination": "main"}, ["c", "d"]]',
                    b"\x00\x00alice@example.com\tmain\n# comment\n"],
    "mapping_file": [b"\x00alice@example.com main\n# x\nbob new # trailing\n"],
    "cluster_message": [b"\x00" + bytes([index]) + b"\x01\x00" for index in range(4)],
    "channel": [b"\x00\x05" + b"".join(bytes([2, index, 0]) for index in range(6)),
                b"\x01" + b"".join(struct.pack("!I", len(message)) + message for message in (
                    b'{"id":7,"call":"apply","args":{"op":"kick","args":{}}}',
                    b'{"event":"log","text":"x"}', b'{"id":1,"result":null}', b"[1]"))],
    "lines": [b"\x02\x01\x00\x00\x00\x00a LOGIN {3}\r\nabc \"q\\\"x\"\r\n250-a\r\n250 b\r\n"],
    "tls_records": [b"\x16\x03\x01\x00\x04abcd\x17\x03\x03\x00\x00\x17\x03\x03\x01\x00"
                    + bytes(256) + b"\x15\x03\x03\x00\x02\x01\x00"],
    "sqlparams": [b"\x02SELECT d FROM m WHERE login = $1 AND note NOT LIKE 'old%' -- $2\n",
                  b"\x05INSERT INTO m VALUES (?, ?) ON CONFLICT (a) DO UPDATE SET d = ?2 /* $3 */",
                  b"\x01SELECT '$1', \"c$1\", E'it\\'s $1', $$ $1 $$, $f$ $2 $f$ FROM t"],
}

#: Every target, by name (what ``scripts/fuzz`` accepts).
TARGETS: dict[str, Callable[[bytes], None]] = dict(sorted(
    (name[len("fuzz_"):], function)
    for namespace in (globals(), vars(protocol_targets))
    for name, function in list(namespace.items())
    if name.startswith("fuzz_") and callable(function)))
