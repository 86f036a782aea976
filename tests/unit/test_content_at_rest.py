"""Content at rest and its key-encryption keys: the pure at-rest format (wrong associated data, wrong
KEK, re-wrap) and the KEK files (owner-only, destroyed for good, ids never reused)."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest
from joserfc.jwk import OctKey

from exchange import files
from exchange.envelope.at_rest import kek_id_of, metadata_digest, open_at_rest, rewrap, seal_at_rest
from exchange.errors import ContentUnavailable, KeyManagementError
from exchange.keys import kek as kek_module
from exchange.keys.kek import KekStore

SIGNED = "eyJhbGciOiJFZERTQSJ9.eyJtc2ciOiJ0ZXN0In0.c2lnbmF0dXJl"  # any compact JWS: opaque here
ROW = {
    "id": "m-1",
    "type": "REQUEST_FOR_INFORMATION",
    "sender": "ID",
    "recipient": "MY",
    "case_ref": "ID-MY/2026/1",
    "thread_id": "m-1",
    "created_at": "2026-11-23T10:00:00+00:00",
    "envelope_sha256": "ab" * 32,
}


def kek(kid: str = "kek-2031-11-1") -> OctKey:
    return OctKey.generate_key(256, {"kid": kid})


def test_content_opens_only_for_its_message_metadata_and_kek() -> None:
    key = kek()
    meta = metadata_digest(ROW)
    stored = seal_at_rest(SIGNED, message_id="m-1", meta=meta, kek=key)
    assert kek_id_of(stored) == "kek-2031-11-1"
    assert open_at_rest(stored, message_id="m-1", meta=meta, kek=lambda _kid: key) == SIGNED
    with pytest.raises(ContentUnavailable, match="another message"):  # moved to another row
        open_at_rest(stored, message_id="m-2", meta=meta, kek=lambda _kid: key)
    edited = metadata_digest({**ROW, "case_ref": "ID-MY/2026/2"})
    with pytest.raises(ContentUnavailable, match="metadata changed"):  # the row's metadata edited
        open_at_rest(stored, message_id="m-1", meta=edited, kek=lambda _kid: key)
    with pytest.raises(ContentUnavailable, match="does not decrypt"):  # another KEK
        open_at_rest(stored, message_id="m-1", meta=meta, kek=lambda _kid: kek())


def test_a_header_swapped_for_another_message_s_does_not_open() -> None:
    key = kek()
    one = seal_at_rest(SIGNED, message_id="m-1", meta="a" * 64, kek=key)
    two = seal_at_rest(SIGNED, message_id="m-2", meta="b" * 64, kek=key)
    forged = ".".join([two.split(".")[0], *one.split(".")[1:]])  # m-2's header on m-1's ciphertext
    with pytest.raises(ContentUnavailable):
        open_at_rest(forged, message_id="m-2", meta="b" * 64, kek=lambda _kid: key)


def test_rewrap_moves_content_to_a_new_kek_and_the_old_one_no_longer_opens_it() -> None:
    old, new = kek("kek-2031-11-1"), kek("kek-2031-11-2")
    stored = seal_at_rest(SIGNED, message_id="m-1", meta="c" * 64, kek=old)
    moved = rewrap(stored, message_id="m-1", meta="c" * 64, old=lambda _kid: old, new=new)
    assert kek_id_of(moved) == "kek-2031-11-2"
    assert open_at_rest(moved, message_id="m-1", meta="c" * 64, kek=lambda _kid: new) == SIGNED
    with pytest.raises(ContentUnavailable):
        open_at_rest(moved, message_id="m-1", meta="c" * 64, kek=lambda _kid: old)


def test_kek_files_are_owner_only_destroyed_for_good_and_ids_never_reused(tmp_path: Path) -> None:
    store = KekStore(tmp_path / "kek", "a-long-enough-passphrase")
    first = store.live("2031-11")
    assert store.live("2031-11").kid == first.kid  # one live KEK per period
    for path in (tmp_path / "kek").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = seal_at_rest(SIGNED, message_id="m-1", meta="d" * 64, kek=first)
    assert open_at_rest(stored, message_id="m-1", meta="d" * 64, kek=store.get) == SIGNED
    assert store.destroy(str(first.kid))
    assert not store.destroy(str(first.kid))  # idempotent
    with pytest.raises(ContentUnavailable, match="destroyed"):
        open_at_rest(stored, message_id="m-1", meta="d" * 64, kek=store.get)
    again = KekStore(tmp_path / "kek", "a-long-enough-passphrase")  # another process: no cache
    with pytest.raises(ContentUnavailable, match="destroyed"):
        again.get(str(first.kid))
    assert again.live("2031-11").kid == "kek-2031-11-2"  # a new key, never the destroyed one's id


def _settle(folder: Path) -> None:
    """The folder last changed ten seconds ago, as after any quiet spell."""
    then = time.time_ns() - 10_000_000_000
    os.utime(folder, ns=(then, then))


def test_the_live_kek_is_listed_once_while_nothing_changes_and_at_once_after_another_process_changed_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message costs a stat of the KEK folder, not a listing of every KEK and tombstone; yet a KEK
    another process makes or destroys decides the live one at once, also when the change leaves
    the folder's modification time as it was (timestamps coarser than the changes)."""
    folder = tmp_path / "kek"
    store = KekStore(folder, "a-long-enough-passphrase")
    other = KekStore(folder, "a-long-enough-passphrase")  # another process of the node
    first = store.live("2031-11")
    listings: list[str | None] = []
    list_folder = store.kids

    def counted(period: str | None = None) -> list[str]:
        listings.append(period)
        return list_folder(period)

    monkeypatch.setattr(store, "kids", counted)
    _settle(folder)
    for _ in range(20):
        assert store.live("2031-11").kid == first.kid
    assert listings == ["2031-11"]  # once: then the settled folder said nothing changed

    second = other.create("2031-11")  # a destruction's new live KEK, in another process
    assert store.live("2031-11").kid == second.kid

    unsettled = os.stat(folder).st_mtime_ns  # changed just now: a listing now is not trusted later
    assert store.live("2031-11").kid == second.kid
    third = other.create("2031-11")
    os.utime(folder, ns=(unsettled, unsettled))  # the second change within the same timestamp
    assert store.live("2031-11").kid == third.kid

    _settle(folder)
    assert store.live("2031-11").kid == third.kid
    settled = os.stat(folder).st_mtime_ns
    fourth = other.create("2031-11")  # a destruction in another process: a new live KEK, and then
    assert other.destroy(str(third.kid))  # the one it replaces destroyed after the commit
    os.utime(folder, ns=(settled, settled))  # a clock stepped back, or the folder's times restored
    assert store.live("2031-11").kid == fourth.kid  # never the destroyed one
    with pytest.raises(ContentUnavailable, match="destroyed"):
        store.get(str(third.kid))


def test_a_new_live_kek_above_a_destroyed_ones_tombstone_is_seen_whatever_the_folders_time(
    tmp_path: Path,
) -> None:
    """The check that stands in for the folder's time looks for the id the next KEK really takes,
    above every tombstone, not merely the one after the cached KEK."""
    folder = tmp_path / "kek"
    store = KekStore(folder, "a-long-enough-passphrase")
    other = KekStore(folder, "a-long-enough-passphrase")  # another process of the node
    first = store.create("2031-11")
    assert other.destroy(str(other.create("2031-11").kid))  # kek-2031-11-2: a tombstone now
    _settle(folder)
    settled = os.stat(folder).st_mtime_ns
    assert store.live("2031-11").kid == first.kid
    third = other.create("2031-11")  # takes id 3, not 2
    os.utime(folder, ns=(settled, settled))  # a clock stepped back, or the folder's times restored
    assert third.kid == "kek-2031-11-3"
    assert store.live("2031-11").kid == third.kid


def test_another_process_never_reads_a_kek_half_destroyed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one process overwrites a KEK it destroys, another finds the KEK gone (content
    unavailable), never the random bytes (a damaged key file); a KEK a crash left half-erased is
    erased by the next destruction."""
    store = KekStore(tmp_path / "kek", "a-long-enough-passphrase")
    first, second = store.create("2031-11"), store.create("2031-12")
    other = KekStore(tmp_path / "kek", "a-long-enough-passphrase")  # no cache: reads the file
    seen: list[str] = []

    def erase_watched(path: Path) -> bool:
        try:
            other.get(str(first.kid))
        except ContentUnavailable:
            seen.append("gone")
        return files.erase(path)

    monkeypatch.setattr(kek_module, "erase", erase_watched)
    assert store.destroy(str(first.kid))
    assert seen == ["gone"]
    monkeypatch.undo()
    doomed = tmp_path / "kek" / f".{second.kid}.jwe.erasing"  # a crash after the rename
    (tmp_path / "kek" / f"{second.kid}.jwe").rename(doomed)
    store.destroy("kek-2031-10-1")  # any later destruction, even of an id already gone
    assert not doomed.exists()
    assert sorted(p.name for p in (tmp_path / "kek").iterdir()) == [
        "kek-2031-11-1.destroyed",
        "master.jwe",
    ]


def test_a_wrong_passphrase_cannot_open_the_kek_files(tmp_path: Path) -> None:
    KekStore(tmp_path / "kek", "a-long-enough-passphrase").live("2031-11")
    intruder = KekStore(tmp_path / "kek", "another-long-passphrase")
    with pytest.raises(KeyManagementError):
        intruder.get("kek-2031-11-1")


def test_only_kek_files_are_kek_ids_ordered_by_period_then_number(tmp_path: Path) -> None:
    """The live KEK of a period is its highest number (10 after 9, not before it); the master key,
    tombstones, files being erased and anything else in the folder are no KEK."""
    store = KekStore(tmp_path / "kek", "a-long-enough-passphrase")
    assert store.kids() == []  # no folder yet
    for _ in range(10):
        store.create("2031-12")
    store.create("2031-11")
    store.destroy("kek-2031-12-3")  # leaves a tombstone
    strays = (".kek-2031-12-11.jwe.erasing", "kek-2031-12-12.jwe.tmp", "kek-2031-1-13.jwe", "kek-2031-12-14")
    for stray in (*strays, "notes.txt"):
        (tmp_path / "kek" / stray).write_text("")
    assert store.kids("2031-12") == [f"kek-2031-12-{n}" for n in (1, 2, 4, 5, 6, 7, 8, 9, 10)]
    assert store.kids() == ["kek-2031-11-1", *store.kids("2031-12")]
    assert store.live("2031-12").kid == "kek-2031-12-10"
    assert store.live("2032-01").kid == "kek-2032-01-1"  # a period without one gets its first


def test_writers_making_a_periods_first_kek_at_once_all_seal_under_the_one_kept(tmp_path: Path) -> None:
    """Any transaction may make a period's first KEK (a batch assuming the ledger head holds no
    lock), in several threads and processes at once. A KEK overwritten after content was sealed
    under it would lose that content for good: the master key and each KEK are created
    exclusively, and a writer that finds its id taken uses the KEK already there."""
    folder = tmp_path / "kek"
    stores = [KekStore(folder, "a-long-enough-passphrase") for _ in range(4)]  # four processes
    periods = [f"2031-{m:02d}" for m in range(1, 13)]
    got: dict[tuple[int, str], OctKey] = {}
    start = threading.Barrier(len(stores) * 2)

    def writer(store_index: int) -> None:
        start.wait()
        for period in periods:
            got[(store_index, period)] = stores[store_index % len(stores)].live(period)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(stores) * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = KekStore(folder, "a-long-enough-passphrase")  # a process started afterwards
    for period in periods:
        assert kept.kids(period) == [f"kek-{period}-1"]  # one KEK per period, no second made
        for (_, of), key in got.items():
            if of == period:
                assert key.kid == f"kek-{period}-1"
                assert key.raw_value == kept.get(f"kek-{period}-1").raw_value  # the one kept
