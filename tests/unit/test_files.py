"""Owner-only, atomic writes of a node's files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from exchange.files import write_private


def test_a_write_that_cannot_take_its_place_leaves_no_copy_behind(tmp_path: Path) -> None:
    """The data goes to a temporary file first: if it cannot be renamed into place (a folder is
    there), the error is raised and no copy of the data (a private key) lingers under another name."""
    (tmp_path / "key.pem").mkdir()
    with pytest.raises(IsADirectoryError):
        write_private(tmp_path / "key.pem", "-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"]


def test_a_write_is_owner_only_and_an_exclusive_one_never_replaces(tmp_path: Path) -> None:
    path = write_private(tmp_path / "a", "one")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_private(path, "two", exclusive=True)
    assert path.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
