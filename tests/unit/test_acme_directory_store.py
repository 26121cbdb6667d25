"""The single instance's SharedStore: a 0700 directory of 0600 files (SPEC §2.13)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred

from stalroute.acme.directory_store import DirectoryStore
from stalroute.acme.store import SharedStore, account_key, certificate_key, challenge_key


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def result(deferred: Deferred) -> object:
    """The result of an already fired Deferred (the directory store answers at once)."""
    out: list[object] = []
    deferred.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()  # type: ignore[attr-defined]
    return out[0]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> DirectoryStore:
    return DirectoryStore(tmp_path / "state" / "acme", clock)


def test_it_is_a_shared_store(store: DirectoryStore) -> None:
    shared: SharedStore = store
    assert shared is store


def test_modes_and_atomic_files(store: DirectoryStore, tmp_path: Path) -> None:
    directory = tmp_path / "state" / "acme"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    result(store.put(account_key("le"), b"-----BEGIN PRIVATE KEY-----\n"))
    files = list(directory.iterdir())
    assert [f.name for f in files] == ["acme%2Faccount%2Fle"]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert result(store.get(account_key("le"))) == b"-----BEGIN PRIVATE KEY-----\n"
    result(store.put(account_key("le"), b"replaced"))
    assert result(store.get(account_key("le"))) == b"replaced"
    assert [f.name for f in directory.iterdir()] == ["acme%2Faccount%2Fle"]  # no temp left


def test_an_existing_directory_is_made_private(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    DirectoryStore(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_get_delete_and_missing(store: DirectoryStore) -> None:
    assert result(store.get(certificate_key("mail"))) is None
    result(store.put(certificate_key("mail"), b'{"chain": "", "key": ""}'))
    result(store.delete(certificate_key("mail")))
    result(store.delete(certificate_key("mail")))  # no error when missing
    assert result(store.get(certificate_key("mail"))) is None


def test_values_expire_and_purge_removes_them(store: DirectoryStore, clock: Clock) -> None:
    result(store.put(challenge_key("tok1"), b"one", ttl=60))
    result(store.put(challenge_key("tok2"), b"two", ttl=600))
    result(store.put(account_key("le"), b"forever"))
    clock.now += 61
    assert result(store.get(challenge_key("tok1"))) is None
    assert result(store.get(challenge_key("tok2"))) == b"two"
    assert result(store.purge()) == 1
    assert store.keys() == [account_key("le"), challenge_key("tok2")]
    clock.now += 600
    assert result(store.purge()) == 1
    assert store.keys() == [account_key("le")]


def test_expiry_survives_a_new_store_on_the_same_directory(tmp_path: Path, clock: Clock) -> None:
    first = DirectoryStore(tmp_path / "d", clock)
    result(first.put("k", b"v", ttl=10))
    second = DirectoryStore(tmp_path / "d", clock)
    assert result(second.get("k")) == b"v"
    clock.now += 10
    assert result(second.get("k")) is None


def test_leases_honour_their_holder_and_ttl(store: DirectoryStore, clock: Clock) -> None:
    assert result(store.acquire_lease("acme_renew", "node-1", 30)) is True
    assert result(store.acquire_lease("acme_renew", "node-1", 30)) is True  # renewed
    assert result(store.acquire_lease("acme_renew", "node-2", 30)) is False
    clock.now += 30
    assert result(store.acquire_lease("acme_renew", "node-2", 30)) is True  # expired
    result(store.release_lease("acme_renew", "node-1"))  # not the holder: nothing
    assert result(store.acquire_lease("acme_renew", "node-1", 30)) is False
    result(store.release_lease("acme_renew", "node-2"))
    assert result(store.acquire_lease("acme_renew", "node-1", 30)) is True
    assert result(store.close()) is None


def test_a_damaged_file_reads_as_missing(store: DirectoryStore, tmp_path: Path) -> None:
    (tmp_path / "state" / "acme" / "broken").write_bytes(b"not json\nvalue")
    assert result(store.get("broken")) is None
    assert result(store.purge()) == 1


def test_write_errors_fail_the_deferred(store: DirectoryStore, tmp_path: Path) -> None:
    shutil.rmtree(tmp_path / "state" / "acme")  # removed under the running store
    with pytest.raises(OSError):
        result(store.put("k", b"v"))
    with pytest.raises(OSError):
        result(store.purge())
