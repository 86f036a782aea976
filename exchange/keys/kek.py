"""Key-encryption keys (KEKs) of content at rest: one live KEK per retention period, in files.

Files under ``<key_dir>/kek/`` (owner-only, written atomically):

- ``master.jwe``: the node's KEK-wrapping key, 32 random bytes in a compact JWE
  ``PBES2-HS512+A256KW``/``A256GCM`` under the node passphrase;
- ``kek-<period>-<n>.jwe``: a KEK, 32 random bytes in a compact JWE ``A256KW``/``A256GCM`` under
  the master key. ``period`` is the month of the destroy date (``2031-11``); the live KEK of a
  period is the one with the highest ``n``;
- ``kek-<period>-<n>.destroyed``: an empty tombstone of a destroyed KEK (its id is never reused);
- ``.kek-<period>-<n>.jwe.erasing``: a KEK being destroyed (renamed away first, then overwritten).

Nothing of a KEK is ever in the database: destroying its file (overwritten, then unlinked) makes
every at-rest copy it wrapped unreadable, in the database and in every backup of the database.
A destruction makes a new live KEK under the ledger lock and moves the ledger head (see
``exchange.lifecycle``), so a message sealed under a KEK it retires is never committed: its
transaction either held the lock or assumed a head the destruction moved. A period's first KEK
may be made by any writer (several at once, in several processes): each KEK file is created
exclusively, and a writer that finds the id taken uses the KEK already there.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from exchange.errors import ContentUnavailable, KeyManagementError
from exchange.files import erase, private_dir, write_private

MASTER_FILE = "master.jwe"
PBES2_ITERATIONS = 210_000  # OWASP's figure for PBKDF2-HMAC-SHA512
_PBES2 = jwe.JWERegistry(algorithms=["PBES2-HS512+A256KW", "A256GCM"])
_WRAP = jwe.JWERegistry(algorithms=["A256KW", "A256GCM"])
_KID = re.compile(r"^kek-(\d{4}-\d{2})-(\d+)$")
#: a folder's modification time this old is settled: a later change cannot leave it as it is,
#: however coarse the file system's timestamps (whole seconds on some)
SETTLED_NS = 2_000_000_000


def kek_id(period: str, n: int) -> str:
    return f"kek-{period}-{n}"


class KekStore:
    """The KEK files of one node. Thread-safe; several processes may share the directory."""

    def __init__(self, folder: Path, passphrase: str) -> None:
        self.folder = folder
        self._passphrase = passphrase
        self._master: OctKey | None = None
        self._cache: dict[str, OctKey] = {}
        self._derived: dict[bytes, bytes] = {}
        #: the live KEK id of a period, with the folder's modification time it was listed under
        #: and the files that say it is still live (its own, and the next id's)
        self._live: dict[str, tuple[int, str, str, str]] = {}
        self._lock = threading.Lock()

    def _master_key(self) -> OctKey:
        if self._master is not None:
            return self._master
        path = self.folder / MASTER_FILE
        password = OctKey.import_key(self._passphrase.encode())
        if not path.exists():
            private_dir(self.folder)  # every KEK is written after the master key: one place creates it
            header = {"alg": "PBES2-HS512+A256KW", "enc": "A256GCM", "p2c": PBES2_ITERATIONS}
            sealed = jwe.encrypt_compact(header, secrets.token_bytes(32), password, registry=_PBES2)
            with contextlib.suppress(FileExistsError):  # another thread or process made it first: theirs
                write_private(path, sealed.encode(), exclusive=True)
        try:
            raw = jwe.decrypt_compact(path.read_bytes(), password, registry=_PBES2).plaintext
        except (JoseError, ValueError) as exc:
            raise KeyManagementError(f"cannot open {path}: wrong passphrase or damaged file") from exc
        if raw is None or len(raw) != 32:
            raise KeyManagementError(f"{path} does not hold a 256-bit key")
        self._master = OctKey.import_key(raw)
        return self._master

    def derived_key(self, purpose: bytes) -> bytes:
        """A 256-bit key for ``purpose`` (a fixed label) derived from the master key with HKDF-SHA256:
        the node's own secret for keyed digests, the same in every process and across restarts.

        Raises:
            KeyManagementError: the master key does not open (wrong passphrase, damaged file).
        """
        derived = self._derived.get(purpose)
        if derived is None:
            master = self._master_key().raw_value
            derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(master)
            self._derived[purpose] = derived
        return derived

    def _path(self, kid: str) -> Path:
        if not _KID.match(kid):
            raise ContentUnavailable(f"{kid!r} is not a KEK id")
        return self.folder / f"{kid}.jwe"

    def get(self, kid: str) -> OctKey:
        """The KEK ``kid``. Raises ContentUnavailable if it was destroyed (or never existed)."""
        path = self._path(kid)
        with self._lock:
            if not path.exists():
                self._cache.pop(kid, None)
                raise ContentUnavailable(f"key-encryption key {kid} was destroyed")
            key = self._cache.get(kid)
            if key is None:
                try:
                    sealed = path.read_bytes()
                except FileNotFoundError:  # destroyed by another process since
                    raise ContentUnavailable(f"key-encryption key {kid} was destroyed") from None
                try:
                    raw = jwe.decrypt_compact(sealed, self._master_key(), registry=_WRAP).plaintext
                except (JoseError, ValueError) as exc:
                    raise KeyManagementError(f"cannot open KEK file {path}") from exc
                key = self._cache[kid] = OctKey.import_key(raw or b"", {"kid": kid})
            return key

    def kids(self, period: str | None = None) -> list[str]:
        """Every KEK id present (of one period), in order of period then ``n``."""
        try:
            names = [entry.name for entry in os.scandir(self.folder)]  # on every message: no pathlib glob
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            match = _KID.match(name.removesuffix(".jwe")) if name.endswith(".jwe") else None
            if match and (period is None or match.group(1) == period):
                found.append((match.group(1), int(match.group(2)), match.group(0)))
        return [kid for _, _, kid in sorted(found)]

    def live(self, period: str) -> OctKey:
        """The live KEK of ``period``, created if the period has none yet (or the one another
        writer created first). Call in a transaction that appends to the ledger: holding its lock,
        or assuming a head, which commits only if no destruction moved it meanwhile.

        The folder is listed again unless the last listing's answer is known to stand: the
        folder's modification time is the one it had then and was settled then (see
        ``SETTLED_NS``), that KEK's file is still there, and the id :meth:`create` would have given
        next is not taken (a new live KEK takes that id: this holds whatever the clocks or the
        folder's times do). So a message costs three ``stat`` calls, not a listing of every KEK
        and tombstone of the node's lifetime."""
        changed = self._folder_changed_ns()
        listed_at = time.time_ns()
        with self._lock:
            seen = self._live.get(period)
            key = self._cache.get(seen[1]) if seen is not None and seen[0] == changed else None
        if seen is not None and key is not None and os.path.exists(seen[2]) and not os.path.exists(seen[3]):
            return key
        existing = self.kids(period)
        key = self.get(existing[-1]) if existing else self.create(period, unless_one_exists=True)
        if changed is not None and listed_at - changed > SETTLED_NS:
            kid, following = str(key.kid), self._next_id(period)
            with self._lock:
                self._live[period] = (changed, kid, str(self._path(kid)), str(self._path(following)))
        return key

    def _next_id(self, period: str) -> str:
        """The id the next KEK of ``period`` takes: above every id the period ever used (a destroyed
        KEK leaves a tombstone, so an id is never reused)."""
        used = [
            int(m.group(2))
            for path in self.folder.glob(f"kek-{period}-*")
            if (m := _KID.match(path.name.split(".")[0]))
        ]
        return kek_id(period, max(used, default=0) + 1)

    def _folder_changed_ns(self) -> int | None:
        try:
            return os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            return None

    def create(self, period: str, *, unless_one_exists: bool = False) -> OctKey:
        """A new KEK for ``period`` that becomes its live one. Each KEK file is created exclusively:
        a writer that finds its id taken (another thread or process created a KEK of the period
        meanwhile) takes the next id, or with ``unless_one_exists`` the period's live KEK instead,
        so no key is ever overwritten with content already sealed under it."""
        raw = secrets.token_bytes(32)
        while True:
            kid = self._next_id(period)
            # (after the id: a KEK made since then is seen here, one made later takes this id too)
            if unless_one_exists and (existing := self.kids(period)):
                return self.get(existing[-1])
            header = {"alg": "A256KW", "enc": "A256GCM", "kid": kid}
            sealed = jwe.encrypt_compact(header, raw, self._master_key(), registry=_WRAP).encode()
            try:
                write_private(self._path(kid), sealed, exclusive=True)
                break
            except FileExistsError:  # another writer took the id: the next one, or theirs
                continue
        key = OctKey.import_key(raw, {"kid": kid})
        with self._lock:
            self._cache[kid] = key
        return key

    def destroy(self, kid: str) -> bool:
        """Remove the KEK file, then overwrite it; False if it was already gone. Idempotent.

        The file is first renamed out of the way (atomically), so a reader in any process finds
        the whole KEK or none, never the random bytes it is overwritten with. What a crash left
        being erased is erased first."""
        path = self._path(kid)
        with self._lock:
            self._cache.pop(kid, None)
            for leftover in self.folder.glob(".kek-*.erasing"):
                erase(leftover)
            doomed = path.with_name(f".{path.name}.erasing")
            try:
                path.rename(doomed)
            except FileNotFoundError:
                return False
            erase(doomed)
            write_private(path.with_suffix(".destroyed"), b"")  # the tombstone: the id is never reused
            return True


def period_of(destroy_after: str) -> str:
    """The retention period (``YYYY-MM``) of an ISO destroy date."""
    return destroy_after[:7]
