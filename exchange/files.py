"""Owner-only files and folders of a node, whatever the process umask.

A node directory holds keys, certificates, settings and (on SQLite) the database: every file the
node writes is created mode 0600 and every folder 0700, set explicitly rather than left to the
umask, so ``umask 000`` cannot make them world-readable or world-writable.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_umask() -> None:
    """Make everything this process creates from now on owner-only (the SQLite WAL included)."""
    os.umask(0o077)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) and make it owner-only. Returns ``path``."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    path.chmod(DIR_MODE)
    return path


def write_private(path: Path, data: bytes | str, *, exclusive: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically, mode 0600 from the first byte: a temporary file in the
    same folder, synced, then renamed over ``path``, so a crash leaves the old file or the new one,
    never half of either. ``exclusive``: never over an existing file (hard-linked into place
    instead of renamed), for a file two writers may create at once and only the first may.

    Raises:
        FileExistsError: ``exclusive`` and ``path`` exists (nothing was written).
    """
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(raw)
            out.flush()
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    if not exclusive:
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # (a key's copy never lingers under another name)
            raise
        return path
    try:
        os.link(tmp, path)  # atomic, and fails where a file is: no writer overwrites another's
    finally:
        tmp.unlink()
    return path


def erase(path: Path) -> bool:
    """Overwrite ``path`` with random bytes, sync and remove it; False if it was already gone.

    Best effort on journaling or copy-on-write file systems: what the key files protect must not
    rest on it alone (they are encrypted too)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    with path.open("r+b") as handle:
        handle.write(secrets.token_bytes(size))
        handle.flush()
        os.fsync(handle.fileno())
    path.unlink()
    return True


def create_private(path: Path) -> None:
    """Create ``path`` empty and owner-only if it does not exist; make it owner-only if it does.

    An existing file is never opened: closing a descriptor of a SQLite database releases every POSIX
    lock this process holds on it, under the feet of its open connections.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        path.chmod(FILE_MODE)
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def restrict_tree(root: Path) -> None:
    """Make every folder under ``root`` 0700 and every file 0600 (``root`` included); a symbolic
    link is neither followed nor changed (what it points to may be outside ``root``)."""
    root.chmod(DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):  # (os.walk does not descend into links)
        for name in dirnames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(DIR_MODE)
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(FILE_MODE)
