"""Reloading TLS files: a replaced file is noticed at the next check (at most once per interval), a
file that does not load keeps the previous context, and re-certifying keeps the key."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from exchange import crypto
from exchange.errors import KeyManagementError
from exchange.files import write_private
from exchange.tls_reload import ReloadingContext, file_identity

PASSPHRASE = "unit-test-passphrase"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def files(tmp_path: Path) -> tuple[crypto.IssuedCertificate, Path, Path]:
    ca = crypto.make_ca("unit CA", "test", PASSPHRASE)
    leaf = crypto.issue_certificate(
        ca,
        PASSPHRASE,
        kind="server",
        common_name="s",
        organisation="test",
        passphrase=PASSPHRASE,
        dns_names=("s",),
    )
    cert, key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    write_private(cert, leaf.cert_pem)
    write_private(key, leaf.key_pem)
    return ca, cert, key


def _reloading(cert: Path, key: Path, clock: Clock) -> ReloadingContext:
    def build() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key), password=PASSPHRASE)
        return ctx

    return ReloadingContext(build, (cert, key), 5.0, name="test", clock=clock)


def test_a_replaced_certificate_is_picked_up_at_the_next_check_only(
    files: tuple[crypto.IssuedCertificate, Path, Path],
) -> None:
    ca, cert, key = files
    clock = Clock()
    reloading = _reloading(cert, key, clock)
    first = reloading.current()
    assert reloading.current() is first
    write_private(cert, crypto.recertify(ca, PASSPHRASE, cert.read_bytes(), days=10))
    clock.now = 4.9
    assert reloading.current() is first  # not checked before the interval
    clock.now = 5.0
    second = reloading.current()
    assert second is not first
    assert reloading.reloads == 1
    clock.now = 10.0
    assert reloading.current() is second  # unchanged files: the same context


def test_files_that_do_not_load_keep_the_previous_context_and_are_retried(
    files: tuple[crypto.IssuedCertificate, Path, Path],
) -> None:
    ca, cert, key = files
    clock = Clock()
    reloading = _reloading(cert, key, clock)
    first = reloading.current()
    other = crypto.issue_certificate(
        ca, PASSPHRASE, kind="server", common_name="s", organisation="t", passphrase=PASSPHRASE
    )
    write_private(cert, other.cert_pem)  # a new certificate for a key not written yet
    clock.now = 5.0
    assert reloading.current() is first
    write_private(key, other.key_pem)  # the key arrives
    clock.now = 10.0
    assert reloading.current() is not first
    assert reloading.reloads == 1


def test_file_identity_changes_with_every_atomic_write_and_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "f.pem"
    assert file_identity([path]) == (None,)
    write_private(path, b"same")
    before = file_identity([path])
    write_private(path, b"same")  # same content and size: a new inode all the same
    assert file_identity([path]) != before


def test_recertify_keeps_the_key_names_and_purpose(
    files: tuple[crypto.IssuedCertificate, Path, Path],
) -> None:
    ca, cert, _ = files
    renewed = crypto.recertify(ca, PASSPHRASE, cert.read_bytes(), days=3)
    old, new = crypto.certificate_info(cert.read_bytes()), crypto.certificate_info(renewed)
    assert new.public_key_sha256 == old.public_key_sha256
    assert (new.common_name, new.purposes) == (old.common_name, old.purposes)
    assert new.fingerprint != old.fingerprint
    assert new.not_after < old.not_after
    with pytest.raises(KeyManagementError):
        crypto.recertify(ca, PASSPHRASE, ca.cert_pem)  # a CA is not a leaf
    with pytest.raises(KeyManagementError):
        crypto.recertify(ca, "wrong-passphrase-123", cert.read_bytes())
