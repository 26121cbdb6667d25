"""stalroute.capabilities: what backends offer before login and what stalroute advertises.

The per-protocol tests feed each backend dialogue the greeting and capability answers that a
real Dovecot 2.3.19 node sent (recorded from the test harness's nodes), so ``offered`` is
checked against what a real backend says, sans-IO.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from stalroute import capabilities
from stalroute.backend import BackendUnavailable
from stalroute.capabilities import (
    PROBE_INTERVAL,
    RULES,
    DestinationCapabilities,
    broken_promises,
    effective,
    explicit_targets,
    probe_targets,
)
from stalroute.config import (
    DEFAULT_IMAP_ADVERTISE,
    DEFAULT_SIEVE_EXTENSIONS,
    DEFAULT_SUBMISSION_EHLO,
    Config,
    parse_config,
)
from stalroute.config.protocols import CAPABILITY_KEYS, LISTENER_PROTOCOLS, PASSTHROUGH_PROTOCOLS
from stalroute.protocols import PROTOCOLS
from stalroute.protocols.base import BackendReady, BackendSend, BackendSettings, BackendStartTLS
from stalroute.protocols.imap import IMAPBackendDialogue
from stalroute.protocols.managesieve import ManageSieveBackendDialogue
from stalroute.protocols.pop3 import POP3BackendDialogue
from stalroute.protocols.submission import SubmissionBackendDialogue
from stalroute.sasl import MECHANISMS
from stalroute.service import OTHER_LISTENERS

# --- what Dovecot 2.3.19 (Pigeonhole 0.5.19) sends, after TLS --------------------------------

DOVECOT_IMAP_GREETING = (b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE "
                         b"LITERAL+ AUTH=PLAIN AUTH=LOGIN] Dovecot (Debian) ready.\r\n")
DOVECOT_POP3_GREETING = b"+OK [XCLIENT] Dovecot (Debian) ready.\r\n"
DOVECOT_POP3_CAPA = (b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
                     b"USER\r\nSASL PLAIN LOGIN\r\n.\r\n")
DOVECOT_SUBMISSION_GREETING = b"220 node1.test Dovecot (Debian) ready.\r\n"
DOVECOT_EHLO = (b"250-node1.test\r\n250-8BITMIME\r\n250-AUTH PLAIN LOGIN\r\n250-BURL imap\r\n"
                b"250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n250-SIZE\r\n250-PIPELINING\r\n"
                b"250 XCLIENT ADDR PORT PROTO HELO LOGIN SESSION TTL TIMEOUT FORWARD\r\n")
PIGEONHOLE_SIEVE = (b"fileinto reject envelope encoded-character vacation subaddress "
                    b"comparator-i;ascii-numeric relational regex imap4flags copy include "
                    b"variables body enotify environment mailbox date index ihave duplicate "
                    b"mime foreverypart extracttext")
DOVECOT_SIEVE_AFTER_TLS = (b'"IMPLEMENTATION" "Dovecot (Debian) Pigeonhole"\r\n"SIEVE" "'
                           + PIGEONHOLE_SIEVE + b'"\r\n"NOTIFY" "mailto"\r\n"SASL" "PLAIN LOGIN"'
                           b'\r\n"VERSION" "1.0"\r\n"XCLIENT"\r\nOK "TLS negotiation successful."'
                           b"\r\n")

DOVECOT_OFFERS = {
    "imap": {"advertise": frozenset({"IMAP4REV1", "SASL-IR", "LOGIN-REFERRALS", "ID", "ENABLE",
                                     "IDLE", "LITERAL+"}),
             "sasl": frozenset({"PLAIN", "LOGIN"})},
    "pop3": {"sasl": frozenset({"PLAIN", "LOGIN"}),
             "capa": frozenset({"CAPA", "TOP", "UIDL", "RESP-CODES", "PIPELINING",
                                "AUTH-RESP-CODE", "USER", "SASL"})},
    "submission": {"ehlo": frozenset({"8BITMIME", "BURL", "CHUNKING", "ENHANCEDSTATUSCODES",
                                      "SIZE", "PIPELINING", "XCLIENT"}),
                   "sasl": frozenset({"PLAIN", "LOGIN"})},
    "managesieve": {"sieve": frozenset(PIGEONHOLE_SIEVE.decode().upper().split()),
                    "sasl": frozenset({"PLAIN", "LOGIN"}), "notify": frozenset({"MAILTO"})},
}


def backend_settings(tls_mode: str = "implicit", **kwargs: Any) -> BackendSettings:
    return BackendSettings(tls_mode=tls_mode, forwarding=None, ehlo_name="proxy.test", **kwargs)


def test_imap_learns_the_greeting_capabilities_over_implicit_tls() -> None:
    dialogue = IMAPBackendDialogue(backend_settings())
    assert dialogue.offered is None
    assert dialogue.receive(DOVECOT_IMAP_GREETING) == [BackendReady()]
    assert dialogue.offered == DOVECOT_OFFERS["imap"]


def test_imap_learns_what_the_backend_offers_after_starttls_not_before() -> None:
    dialogue = IMAPBackendDialogue(backend_settings("starttls"))
    events = dialogue.receive(b"* OK [CAPABILITY IMAP4rev1 IMAP4rev2 STARTTLS LOGINDISABLED] "
                              b"ready\r\n")
    assert events == [BackendSend(b"SRx1 STARTTLS\r\n")]
    assert dialogue.receive(b"SRx1 OK Begin TLS negotiation now.\r\n") == [BackendStartTLS()]
    assert dialogue.tls_started() == [BackendSend(b"SRx2 CAPABILITY\r\n")]
    events = dialogue.receive(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\nSRx2 OK done\r\n")
    assert events == [BackendReady()]
    assert dialogue.offered == {"advertise": frozenset({"IMAP4REV1", "SASL-IR"}),
                                "sasl": frozenset({"PLAIN"})}


def test_pop3_asks_for_capa_only_when_probing() -> None:
    login = POP3BackendDialogue(backend_settings())
    assert login.receive(DOVECOT_POP3_GREETING) == [BackendReady()]  # no extra round trip
    assert login.offered is None

    probe = POP3BackendDialogue(backend_settings(learn_capabilities=True))
    assert probe.receive(DOVECOT_POP3_GREETING) == [BackendSend(b"CAPA\r\n")]
    assert probe.receive(DOVECOT_POP3_CAPA) == [BackendReady()]
    assert probe.offered == DOVECOT_OFFERS["pop3"]


def test_pop3_without_capa_offers_no_mechanism() -> None:
    probe = POP3BackendDialogue(backend_settings(learn_capabilities=True))
    probe.receive(b"+OK ready\r\n")
    assert probe.receive(b"-ERR unknown command\r\n") == [BackendReady()]
    assert probe.offered == {"sasl": frozenset(), "capa": frozenset()}


def test_pop3_forgets_the_capabilities_read_before_stls() -> None:
    probe = POP3BackendDialogue(backend_settings("starttls", learn_capabilities=True))
    probe.receive(b"+OK ready\r\n")
    assert probe.receive(b"+OK\r\nSTLS\r\nSASL OAUTHBEARER\r\n.\r\n") == [BackendSend(b"STLS\r\n")]
    assert probe.receive(b"+OK go\r\n") == [BackendStartTLS()]
    assert probe.tls_started() == [BackendSend(b"CAPA\r\n")]
    assert probe.receive(b"-ERR no\r\n") == [BackendReady()]
    assert probe.offered == {"sasl": frozenset(), "capa": frozenset()}


def test_submission_learns_the_ehlo_keywords_and_mechanisms() -> None:
    dialogue = SubmissionBackendDialogue(backend_settings())
    assert dialogue.receive(DOVECOT_SUBMISSION_GREETING) == [BackendSend(b"EHLO proxy.test\r\n")]
    assert dialogue.receive(DOVECOT_EHLO) == [BackendReady()]
    assert dialogue.offered == DOVECOT_OFFERS["submission"]


def test_managesieve_learns_the_block_resent_after_starttls() -> None:
    dialogue = ManageSieveBackendDialogue(backend_settings("starttls"))
    before = b'"SIEVE" "fileinto vacation-seconds"\r\n"SASL" ""\r\n"STARTTLS"\r\nOK "ready"\r\n'
    assert dialogue.receive(before) == [BackendSend(b"STARTTLS\r\n")]
    assert dialogue.receive(b'OK "Begin TLS negotiation now."\r\n') == [BackendStartTLS()]
    assert dialogue.tls_started() == []
    assert dialogue.offered is None
    assert dialogue.receive(DOVECOT_SIEVE_AFTER_TLS) == [BackendReady()]
    assert dialogue.offered == DOVECOT_OFFERS["managesieve"]


# --- what stalroute advertises -------------------------------------------------------------------

PROTOCOL_TLS = {"imap": "implicit", "pop3": "implicit", "submission": "implicit",
                "managesieve": "starttls"}


def make_config(capabilities: dict[str, Any] | None = None,
                destinations: dict[str, tuple[str, ...]] | None = None) -> Config:
    """``destinations``: name → the protocols it declares; the first is the default, and
    each of its protocols has a listener."""
    destinations = destinations or {"node1": tuple(PROTOCOL_TLS)}
    default = next(iter(destinations))
    document: dict[str, Any] = {
        "routing": {"default_destination": default},
        "mapping": {"source": "file", "file": {"path": "mappings.tsv"}},
        "destination": {
            name: {"host": f"{name}.example",
                   "protocol": {p: {"port": 1000 + i, "tls": PROTOCOL_TLS[p]}
                                for i, p in enumerate(protocols)}}
            for name, protocols in destinations.items()},
        "listener": {p: {"protocol": p, "bind": [f"127.0.0.1:{2000 + i}"], "tls": "starttls"}
                     for i, p in enumerate(destinations[default])},
    }
    if capabilities is not None:
        document["capabilities"] = capabilities
    return parse_config(document, Path("/nonexistent"), check_files=False)


def test_config_records_which_keys_the_file_sets() -> None:
    config = make_config({"imap": {"advertise": ["IMAP4rev2"], "banner": "hi"},
                          "pop3": {"sasl": ["PLAIN"]}})
    assert config.capabilities.for_protocol("imap").explicit == {"advertise", "banner"}
    assert config.capabilities.for_protocol("pop3").explicit == {"sasl"}
    assert config.capabilities.for_protocol("submission").explicit == frozenset()
    assert config.capabilities.for_protocol("submission").ehlo == DEFAULT_SUBMISSION_EHLO


def test_until_a_destination_answers_the_fallback_is_advertised() -> None:
    config = make_config()
    imap = effective(config, "imap", {}).section
    assert imap.advertise == ("IMAP4rev1", "ENABLE", "SASL-IR", "LITERAL+", "ID")
    assert imap.sasl == ("PLAIN", "LOGIN")
    submission = effective(config, "submission", {}).section
    assert submission.ehlo == ("ENHANCEDSTATUSCODES", "8BITMIME", "PIPELINING", "CHUNKING", "SIZE")
    sieve = effective(config, "managesieve", {})
    assert "vacation-seconds" not in sieve.section.sieve
    assert "enotify" in sieve.section.sieve and sieve.settings.notify == ("mailto",)
    for protocol in RULES:  # the fallback never adds to the configured lists
        assert set(effective(config, protocol, {}).section.sasl) <= set(MECHANISMS)


def test_dovecot_answers_narrow_the_defaults() -> None:
    config = make_config()
    offers = {("node1", protocol): offer for protocol, offer in DOVECOT_OFFERS.items()}
    imap = effective(config, "imap", offers).section
    assert imap.advertise == ("IMAP4rev1", "ENABLE", "SASL-IR", "LITERAL+", "ID")
    assert imap.sasl == ("PLAIN", "LOGIN")
    assert "SMTPUTF8" not in effective(config, "submission", offers).section.ehlo
    sieve = effective(config, "managesieve", offers)
    assert sieve.section.sieve == tuple(
        e for e in DEFAULT_SIEVE_EXTENSIONS if e not in ("vacation-seconds", "editheader"))
    assert sieve.settings.notify == ("mailto",)
    assert not effective(config, "pop3", offers).settings.utf8  # Dovecot 2.3 lists no UTF8


def test_pop3_utf8_is_advertised_only_when_every_destination_lists_it() -> None:
    config = make_config(destinations={"node1": ("pop3",), "node2": ("pop3",)})
    with_utf8 = {"sasl": frozenset({"PLAIN"}), "capa": frozenset({"USER", "UTF8"})}
    offers = {("node1", "pop3"): with_utf8, ("node2", "pop3"): with_utf8}
    assert effective(config, "pop3", offers).settings.utf8
    offers[("node2", "pop3")] = DOVECOT_OFFERS["pop3"]
    assert not effective(config, "pop3", offers).settings.utf8
    assert not effective(config, "pop3", {}).settings.utf8  # nobody answered yet


def test_a_richer_backend_gets_everything_configured_and_nothing_more() -> None:
    config = make_config()
    rich = {"advertise": frozenset({"IMAP4REV2", "IMAP4REV1", "ENABLE", "SASL-IR", "LITERAL+",
                                    "ID", "UTF8=ACCEPT", "IDLE", "QUOTA"}),
            "sasl": frozenset({"PLAIN", "OAUTHBEARER", "XOAUTH2", "SCRAM-SHA-256"})}
    imap = effective(config, "imap", {("node1", "imap"): rich}).section
    assert imap.advertise == DEFAULT_IMAP_ADVERTISE  # no IDLE or QUOTA: only configured words
    assert imap.sasl == MECHANISMS  # LOGIN is honoured: it is replayed as PLAIN


def test_every_destination_serving_the_protocol_must_honour_a_word() -> None:
    config = make_config(destinations={"node1": ("imap",), "node2": ("imap",),
                                       "web": ("submission",)})
    rich = {"advertise": frozenset(w.upper() for w in DEFAULT_IMAP_ADVERTISE),
            "sasl": frozenset({"PLAIN", "OAUTHBEARER"})}
    plain_only = {"advertise": rich["advertise"], "sasl": frozenset({"PLAIN"})}
    offers = {("node1", "imap"): rich, ("node2", "imap"): plain_only,
              ("web", "submission"): {"ehlo": frozenset(), "sasl": frozenset()}}
    imap = effective(config, "imap", offers).section
    assert imap.advertise == DEFAULT_IMAP_ADVERTISE
    assert imap.sasl == ("PLAIN", "LOGIN")
    # node2 never answered: it counts as the fallback, so IMAP4rev2 is not promised.
    del offers[("node2", "imap")]
    assert "IMAP4rev2" not in effective(config, "imap", offers).section.advertise


def test_a_backend_without_plain_honours_neither_plain_nor_login() -> None:
    config = make_config()
    offers = {("node1", "pop3"): {"sasl": frozenset({"LOGIN", "XOAUTH2"})}}
    assert effective(config, "pop3", offers).section.sasl == ("XOAUTH2",)


def test_explicit_lists_are_advertised_as_written() -> None:
    config = make_config({"imap": {"advertise": ["IMAP4rev2", "IMAP4rev1"],
                                   "sasl": ["PLAIN", "XOAUTH2"]},
                          "submission": {"ehlo": ["SMTPUTF8"]}})
    offers = {("node1", protocol): offer for protocol, offer in DOVECOT_OFFERS.items()}
    imap = effective(config, "imap", offers).section
    assert imap.advertise == ("IMAP4rev2", "IMAP4rev1") and imap.sasl == ("PLAIN", "XOAUTH2")
    submission = effective(config, "submission", offers).section
    assert submission.ehlo == ("SMTPUTF8",)
    assert submission.sasl == ("PLAIN", "LOGIN")  # not explicit: narrowed


def test_broken_promises_name_the_key_the_destination_and_the_words() -> None:
    config = make_config({"imap": {"advertise": ["IMAP4rev2", "IMAP4rev1", "STARTTLS"],
                                   "sasl": ["PLAIN", "LOGIN"]},
                          "submission": {"ehlo": ["SMTPUTF8", "SIZE", "AUTH"]}})
    imap = broken_promises(config, "node1", "imap", DOVECOT_OFFERS["imap"])
    # STARTTLS is stalroute's own; LOGIN is replayed as PLAIN, which Dovecot offers.
    assert imap == ["capabilities.imap.advertise: destination node1 does not offer IMAP4rev2; "
                    "clients relying on it will fail there"]
    submission = broken_promises(config, "node1", "submission", DOVECOT_OFFERS["submission"])
    assert [w.split(";")[0] for w in submission] == [
        "capabilities.submission.ehlo: destination node1 does not offer SMTPUTF8"]
    assert broken_promises(config, "node1", "pop3", DOVECOT_OFFERS["pop3"]) == []


def test_the_registry_and_the_config_schema_name_the_same_protocols() -> None:
    """A protocol is registered once (``stalroute.protocols``); the schema's vocabulary and
    capability sections must follow it."""
    assert set(PROTOCOLS) | set(OTHER_LISTENERS) == set(LISTENER_PROTOCOLS)
    assert {name for name, spec in PROTOCOLS.items() if spec.passthrough} == set(
        PASSTHROUGH_PROTOCOLS)
    assert set(RULES) == set(CAPABILITY_KEYS)
    for protocol, rules in RULES.items():
        assert set(rules.learnt) <= {"sasl", *CAPABILITY_KEYS[protocol]}
        assert set(rules.fallback) >= set(rules.learnt)


def test_only_protocols_with_a_listener_and_an_explicit_list_are_checked() -> None:
    config = make_config({"imap": {"banner": "hi"}, "pop3": {"sasl": ["PLAIN"]}},
                         destinations={"node1": ("imap", "pop3"), "node2": ("imap",)})
    assert [(d.name, p) for d, p in probe_targets(config)] == [
        ("node1", "imap"), ("node2", "imap"), ("node1", "pop3")]
    assert [(d.name, p) for d, p in explicit_targets(config)] == [("node1", "pop3")]


def test_preauth_settings_carry_the_narrowed_lists() -> None:
    config = make_config()
    learned = DestinationCapabilities()
    learned.offers = {("node1", protocol): offer for protocol, offer in DOVECOT_OFFERS.items()}
    imap = learned.preauth_settings(config, config.listeners["imap"])
    assert "IMAP4rev2" not in imap.capabilities.advertise and imap.sasl == ("PLAIN", "LOGIN")
    sieve = learned.preauth_settings(config, config.listeners["managesieve"])
    assert sieve.capabilities.notify == ("mailto",)


# --- probing: start, periodically, reloads -----------------------------------------------------


class FakeProbes:
    """Stands in for :func:`stalroute.capabilities.probe`: each call waits for the test; a
    cancelled one fails as a real one does (the connector reports the leg unavailable)."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, str, Deferred[Any]]] = []

    async def __call__(self, connector, destination, protocol, client) -> Any:
        answer: Deferred[Any] = Deferred(
            lambda d: d.errback(BackendUnavailable("connect timed out")))
        self.pending.append((destination.name, protocol, answer))
        return await answer

    def answer(self, destination: str, protocol: str, result: Any) -> None:
        for index, (name, proto, answer) in enumerate(self.pending):
            if (name, proto) == (destination, protocol):
                del self.pending[index]
                if isinstance(result, Exception):
                    answer.errback(result)
                else:
                    answer.callback(result)
                return
        raise AssertionError(f"no probe of {destination} ({protocol}) pending")

    def asked(self) -> list[tuple[str, str]]:
        return sorted((name, proto) for name, proto, answer in self.pending if not answer.called)


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> FakeProbes:
    fake = FakeProbes()
    monkeypatch.setattr(capabilities, "probe", fake)
    return fake


IMAP_ONLY = {"node1": ("imap",), "node2": ("imap",)}
RICH_IMAP = {"advertise": frozenset({"IMAP4REV2", "IMAP4REV1"}), "sasl": frozenset({"PLAIN"})}


def test_probes_run_at_start_and_every_interval_without_blocking(probes: FakeProbes) -> None:
    clock, config = Clock(), make_config(destinations=IMAP_ONLY)
    learned = DestinationCapabilities()
    learned.start(clock, config)
    assert probes.asked() == [("node1", "imap"), ("node2", "imap")]
    assert learned.advertised(config, "imap").section.advertise[0] == "IMAP4rev1"
    probes.answer("node1", "imap", RICH_IMAP)
    probes.answer("node2", "imap", RICH_IMAP)
    assert learned.advertised(config, "imap").section.advertise == ("IMAP4rev2", "IMAP4rev1")
    clock.advance(PROBE_INTERVAL - 1)
    assert probes.asked() == []
    clock.advance(1)
    assert probes.asked() == [("node1", "imap"), ("node2", "imap")]
    learned.stop()


def test_an_unreachable_destination_keeps_its_last_answer(probes: FakeProbes,
                                                         logged: list[str]) -> None:
    clock, config = Clock(), make_config(destinations=IMAP_ONLY)
    learned = DestinationCapabilities()
    learned.start(clock, config)
    probes.answer("node1", "imap", RICH_IMAP)
    probes.answer("node2", "imap", RICH_IMAP)
    for _round in range(2):
        clock.advance(PROBE_INTERVAL)
        probes.answer("node1", "imap", BackendUnavailable("down"))
        probes.answer("node2", "imap", BackendUnavailable("down"))
    assert learned.offers[("node1", "imap")] == RICH_IMAP
    assert "IMAP4rev2" in learned.advertised(config, "imap").section.advertise
    warnings = [text for text in logged if "capability probe" in text]
    assert len(warnings) == 2 and "keeping its last answer" in warnings[0]  # once per outage
    learned.stop()


def test_a_reload_reprobes_and_keeps_answers_meanwhile(probes: FakeProbes,
                                                       logged: list[str]) -> None:
    clock, config = Clock(), make_config(destinations=IMAP_ONLY)
    learned = DestinationCapabilities()
    learned.start(clock, config)
    probes.answer("node1", "imap", RICH_IMAP)
    # Reload before node2 answered: node2 is gone from the new configuration.
    reloaded = make_config(destinations={"node1": ("imap",)})
    learned.start(clock, reloaded)
    assert ("node1", "imap") in learned.offers
    assert probes.asked() == [("node1", "imap")]
    # node2's abandoned probe failed; nobody counts that as node2 being down.
    assert not [text for text in logged if "capability probe" in text]
    assert learned.advertised(reloaded, "imap").section.advertise == ("IMAP4rev2",
                                                                          "IMAP4rev1")
    narrower = {"advertise": frozenset({"IMAP4REV1"}), "sasl": frozenset({"PLAIN"})}
    probes.answer("node1", "imap", narrower)
    assert learned.advertised(reloaded, "imap").section.advertise == ("IMAP4rev1",)
    learned.stop()
    clock.advance(PROBE_INTERVAL)
    assert probes.asked() == []
