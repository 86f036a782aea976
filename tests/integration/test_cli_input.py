"""Bad input to the CLI, the agreement and the settings: one line naming the argument, a non-zero
exit, never a traceback; and the files a node writes are owner-only whatever the umask."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import sqlalchemy as sa
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from exchange import crypto
from exchange.db.engine import Database
from tests.integration.test_cli import one_line_error
from tests.support import CLIENT_PASSPHRASE, PASSPHRASE, NodeDir, make_pair, set_node_options


def run(
    *args: str, passphrase: str | None = PASSPHRASE, umask: int | None = None, **env_extra: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    if passphrase is not None:
        env["EXCHANGE_KEY_PASSPHRASE"] = passphrase
    env["EXCHANGE_CLIENT_KEY_PASSPHRASE"] = CLIENT_PASSPHRASE
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "exchange", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


@pytest.fixture
def pair(tmp_path: Path) -> tuple[NodeDir, NodeDir]:
    return make_pair(tmp_path)


def test_cli_usage_errors_are_one_line_naming_the_argument(tmp_path: Path) -> None:
    one_line_error(run("frobnicate"), 2, "No such command", "frobnicate")
    one_line_error(run("init", "--dir", str(tmp_path / "n")), 2, "--party")
    one_line_error(run("init", "--party", "ID", "--dir", str(tmp_path / "n"), "--port", "abc"), 2, "--port")
    (tmp_path / "file").write_text("x")
    one_line_error(run("init", "--party", "ID", "--dir", str(tmp_path / "file")), 2, "--dir")
    one_line_error(run("agreement", "check"), 2, "path")


def test_init_refuses_a_port_out_of_range_an_http_endpoint_and_a_host_name_with_spaces(
    tmp_path: Path,
) -> None:
    base = ["init", "--party", "ID", "--dir", str(tmp_path / "n")]
    one_line_error(run(*base, "--port", "99999"), 2, "--port", "65535")
    one_line_error(run(*base, "--endpoint", "http://id.example:8443"), 2, "--endpoint", "https://")
    one_line_error(run(*base, "--endpoint", "https://id.example/x?y"), 2, "--endpoint")
    one_line_error(run(*base, "--hostname", "bad host"), 2, "--hostname")
    one_line_error(run(*base, "--host", "0.0.0.0 ; rm"), 2, "--host")
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("passphrase", [" " * 12, "password1234", "aaaaaaaaaaaab", "Changeme-2026!"])
def test_weak_passphrases_are_refused(tmp_path: Path, passphrase: str) -> None:
    one_line_error(run("init", "--party", "ID", "--dir", str(tmp_path / "n"), passphrase=passphrase), 2)


def test_a_missing_certificate_file_and_a_party_file_that_is_not_toml_are_one_line(
    pair: tuple[NodeDir, NodeDir], tmp_path: Path
) -> None:
    id_dir, my_dir = pair
    one_line_error(
        run(
            "clients", "add", "--dir", str(id_dir.path), "--id", "x", "--agency", "a", "--unit", "u",
            "--clearance", "RAHASIA", "--cert", str(tmp_path / "missing.pem"),
        ),
        2,
        "--cert",
    )  # fmt: skip
    (tmp_path / "bad.toml").write_text("[[ not toml")
    one_line_error(
        run(
            "agreement", "compose", "--party", str(tmp_path / "bad.toml"),
            "--party", str(my_dir.path / "party.toml"), "--out", str(tmp_path / "a.toml"),
        ),
        2,
        "--party",
        "not a TOML party file",
    )  # fmt: skip
    (tmp_path / "tls-missing").mkdir()
    (id_dir.path / "tls" / "server.pem").rename(tmp_path / "tls-missing" / "server.pem")
    one_line_error(run("serve", "--dir", str(id_dir.path)), 2, "missing TLS files", "server.pem")


def test_a_bad_jwk_to_envelope_open_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "e.jwe").write_text("a.b.c.d.e")
    (tmp_path / "bad.json").write_text(json.dumps({"kty": "OKP", "crv": "X25519", "x": "!!", "kid": "k"}))
    (tmp_path / "notjson.json").write_text("{")
    for bad in ("bad.json", "notjson.json", "missing.json"):
        one_line_error(
            run(
                "envelope", "open", "--envelope", str(tmp_path / "e.jwe"),
                "--decryption-key", str(tmp_path / bad), "--verification-key", str(tmp_path / bad),
            ),
            2,
            "--decryption-key",
        )  # fmt: skip


def test_an_unknown_log_level_in_node_toml_is_named(pair: tuple[NodeDir, NodeDir]) -> None:
    id_dir, _ = pair
    set_node_options(id_dir.path, log_level="loud")
    one_line_error(run("serve", "--dir", str(id_dir.path)), 2, "log_level")


def _add(node: NodeDir, *args: str) -> subprocess.CompletedProcess[str]:
    base = ["clients", "add", "--dir", str(node.path), "--agency", "Polri", "--unit", "TPPO"]
    defaults = [
        *([] if "--type" in args else ["--type", "ALL"]),
        *([] if "--purpose" in args else ["--purpose", "ALL"]),
    ]
    return run(*base, "--clearance", "RAHASIA", *defaults, *args)


def test_clients_add_refuses_unknown_roles_types_purposes_and_bad_ids(pair: tuple[NodeDir, NodeDir]) -> None:
    id_dir, _ = pair
    out = id_dir.path / "clients"
    assert (
        run("pki", "issue-client", "--dir", str(id_dir.path), "--name", "c2", "--out", str(out)).returncode
        == 0
    )
    cert = ["--cert", str(out / "c2.pem")]
    one_line_error(_add(id_dir, "--id", "c2", *cert, "--role", "GOD"), 2, "--role", "GOD")
    one_line_error(_add(id_dir, "--id", "c2", *cert, "--type", "GOSSIP"), 2, "--type", "GOSSIP")
    one_line_error(_add(id_dir, "--id", "c2", *cert, "--purpose", "FUN"), 2, "--purpose", "FUN")
    one_line_error(_add(id_dir, "--id", "", *cert), 2, "--id")
    one_line_error(_add(id_dir, "--id", "bad\x1bid", *cert), 2, "--id")
    one_line_error(_add(id_dir, "--id", "../x", *cert), 2, "--id")
    ok = _add(id_dir, "--id", "c2", *cert, "--role", "INVESTIGATOR", "--type", "RESPONSE")
    assert ok.returncode == 0, ok.stderr


def test_clients_add_refuses_the_nodes_own_server_and_node_certificates(
    pair: tuple[NodeDir, NodeDir],
) -> None:
    id_dir, _ = pair
    for name in ("server.pem", "node.pem", "ca.pem"):
        one_line_error(
            _add(id_dir, "--id", "intruder", "--cert", str(id_dir.path / "tls" / name)), 2, "--cert"
        )


def test_pki_issue_client_refuses_a_name_that_leaves_the_out_folder(
    pair: tuple[NodeDir, NodeDir], tmp_path: Path
) -> None:
    id_dir, _ = pair
    out = tmp_path / "out"
    for name in ("../../evil", "/etc/evil", ".hidden", "a/b"):
        one_line_error(
            run("pki", "issue-client", "--dir", str(id_dir.path), "--name", name, "--out", str(out)),
            2,
            "--name",
        )
    assert not list(tmp_path.rglob("*evil*"))


def test_a_dev_client_key_is_encrypted_with_its_own_passphrase_not_the_nodes(
    pair: tuple[NodeDir, NodeDir], tmp_path: Path
) -> None:
    id_dir, _ = pair
    args = ["pki", "issue-client", "--dir", str(id_dir.path), "--name", "own", "--out", str(tmp_path)]
    assert run(*args).returncode == 0
    key = (tmp_path / "own-key.pem").read_bytes()
    crypto.decrypt_private_pem(key, CLIENT_PASSPHRASE)
    with pytest.raises(Exception, match="cannot decrypt"):
        crypto.decrypt_private_pem(key, PASSPHRASE)
    one_line_error(run(*args, EXCHANGE_CLIENT_KEY_PASSPHRASE=PASSPHRASE), 2, "must differ")


def test_clients_add_csr_signs_the_clients_own_key_and_registers_it(
    pair: tuple[NodeDir, NodeDir], tmp_path: Path
) -> None:
    id_dir, _ = pair
    key_pem, csr_pem = crypto.make_csr("cms-csr", "the-client-keeps-this-key")
    (tmp_path / "cms.csr").write_bytes(csr_pem)
    out = tmp_path / "cms.pem"
    proc = _add(id_dir, "--id", "cms-csr", "--csr", str(tmp_path / "cms.csr"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    key = serialization.load_pem_private_key(key_pem, password=b"the-client-keeps-this-key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)
    info = crypto.certificate_info(out.read_bytes())
    assert crypto.CLIENT_AUTH_OID in info.purposes
    assert crypto.NODE_PURPOSE_OID not in info.purposes
    listed = run("clients", "list", "--dir", str(id_dir.path))
    assert "cms-csr" in listed.stdout
    # the CSR's name must be the id registered; garbage is one line
    one_line_error(
        _add(id_dir, "--id", "other", "--csr", str(tmp_path / "cms.csr"), "--out", str(out)), 2, "--csr"
    )
    (tmp_path / "junk.csr").write_text("junk")
    one_line_error(
        _add(id_dir, "--id", "j", "--csr", str(tmp_path / "junk.csr"), "--out", str(out)), 2, "--csr"
    )


def _break_agreement(node: NodeDir) -> None:
    path = node.path / "agreement.toml"
    data = tomllib.loads(path.read_text())
    data["message_types"]["RESPONSE"]["schema"] = "no-such-schema.json"
    data["parties"]["ID"]["node_name"] = ""
    data["parties"]["MY"]["scheme"] = data["parties"]["ID"]["scheme"]
    data["parties"]["MY"]["encryption_keys"][0]["kid"] = data["parties"]["ID"]["signing_keys"][0]["kid"]
    data["parties"]["MY"]["ca_certificate"] = (
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    )
    path.write_text(tomli_w.dumps(data))


def test_agreement_check_reports_every_error_at_once(pair: tuple[NodeDir, NodeDir]) -> None:
    id_dir, _ = pair
    _break_agreement(id_dir)
    needles = (
        "no-such-schema.json",
        "parties.ID.node_name",
        "is already the scheme of ID",
        "used twice",
        "parties.MY.ca_certificate",
    )
    one_line_error(run("agreement", "check", str(id_dir.path / "agreement.toml")), 2, *needles)
    one_line_error(run("serve", "--dir", str(id_dir.path)), 2, *needles)


def test_a_missing_payload_schema_stops_the_node_from_starting(pair: tuple[NodeDir, NodeDir]) -> None:
    id_dir, _ = pair
    path = id_dir.path / "agreement.toml"
    data = tomllib.loads(path.read_text())
    data["message_types"]["RESPONSE"]["schema"] = "response-v9.json"
    path.write_text(tomli_w.dumps(data))
    one_line_error(run("serve", "--dir", str(id_dir.path)), 2, "message_types.RESPONSE.schema", "response-v9")


def test_a_node_directory_of_one_party_does_not_start_as_the_other(pair: tuple[NodeDir, NodeDir]) -> None:
    id_dir, _ = pair
    set_node_options(id_dir.path, party="MY")
    proc = run("serve", "--dir", str(id_dir.path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error: " in proc.stderr


def test_db_upgrade_says_what_it_did_and_serve_before_it_leaves_no_database(
    pair: tuple[NodeDir, NodeDir],
) -> None:
    node = pair[0].path
    (node / "node.db").unlink()
    one_line_error(run("serve", "--dir", str(node)), 2, "exchange db upgrade")
    assert not (node / "node.db").exists()
    first = run("db", "upgrade", "--dir", str(node))
    assert first.returncode == 0, first.stderr
    assert "upgraded from (empty) to" in first.stdout
    assert first.stderr == ""  # no Alembic INFO lines
    again = run("db", "upgrade", "--dir", str(node))
    assert "already at the latest revision" in again.stdout
    assert again.stderr == ""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_node_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    node = tmp_path / "n"
    assert run("init", "--party", "ID", "--dir", str(node), umask=0).returncode == 0
    assert run("db", "upgrade", "--dir", str(node), umask=0).returncode == 0
    for path in [node, *node.rglob("*")]:
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), path
    # the SQLite WAL and shared-memory files take the database file's mode
    old = os.umask(0)
    try:
        db = Database(f"sqlite:///{node / 'node.db'}")
        with db.transaction() as conn:
            conn.execute(sa.text("create table t (x int)"))
            for suffix in ("-wal", "-shm"):
                assert _mode(node / f"node.db{suffix}") == 0o600
        db.dispose()
    finally:
        os.umask(old)


def test_files_that_are_not_utf8_text_are_one_line_errors(
    pair: tuple[NodeDir, NodeDir], tmp_path: Path
) -> None:
    """A settings, agreement or passphrase file holding bytes that are not UTF-8: one line, exit 2,
    no traceback, and no byte of the passphrase file echoed."""
    id_dir, _ = pair
    (tmp_path / "bad.toml").write_bytes(b'version = "1"\n\xff = 1\n')
    one_line_error(run("agreement", "check", str(tmp_path / "bad.toml")), 2, "not UTF-8")
    secret = tmp_path / "passphrase"
    secret.write_bytes(b"\xffsecret-passphrase-\xfe")
    proc = run(
        "init",
        "--party",
        "ID",
        "--dir",
        str(tmp_path / "n"),
        passphrase=None,
        EXCHANGE_KEY_PASSPHRASE_FILE=str(secret),
    )
    one_line_error(proc, 2, "not UTF-8")
    assert "secret" not in proc.stderr
    assert "\\xff" not in proc.stderr
    settings = id_dir.path / "node.toml"
    settings.write_bytes(settings.read_bytes() + b'\nlog_level = "\xff"\n')
    one_line_error(run("db", "upgrade", "--dir", str(id_dir.path)), 2, "node.toml", "not UTF-8")


def test_the_passphrase_is_refused_in_node_toml(pair: tuple[NodeDir, NodeDir]) -> None:
    """It would sit beside the keys it protects and travel with every copy of the directory."""
    id_dir, _ = pair
    with (id_dir.path / "node.toml").open("a") as settings:
        settings.write(f'key_passphrase = "{PASSPHRASE}"\n')
    proc = run("db", "upgrade", "--dir", str(id_dir.path), passphrase=None)
    one_line_error(proc, 2, "holds key_passphrase", "EXCHANGE_KEY_PASSPHRASE")
    assert PASSPHRASE not in proc.stderr


def test_no_command_writes_over_an_existing_file(pair: tuple[NodeDir, NodeDir], tmp_path: Path) -> None:
    """`pki issue-client --name ca --out <node>/tls` would have replaced the CA's key; an output
    that exists is refused in one line and left as it was, and a refused registration writes no
    certificate."""
    id_dir, my_dir = pair
    tls = id_dir.path / "tls"
    before = {name: (tls / name).read_bytes() for name in ("ca.pem", "ca-key.pem", "server-key.pem")}
    for name in ("ca", "server"):
        one_line_error(
            run("pki", "issue-client", "--dir", str(id_dir.path), "--name", name, "--out", str(tls)),
            2,
            "exists",
        )
    assert {name: (tls / name).read_bytes() for name in before} == before
    precious = tmp_path / "precious.pem"
    precious.write_text("keep me")
    _key, csr_pem = crypto.make_csr("cms-out", "the-client-keeps-this-key")
    (tmp_path / "cms.csr").write_bytes(csr_pem)
    one_line_error(
        _add(id_dir, "--id", "cms-out", "--csr", str(tmp_path / "cms.csr"), "--out", str(precious)),
        2,
        "exists",
    )
    assert precious.read_text() == "keep me"
    listed = run("clients", "list", "--dir", str(id_dir.path)).stdout
    assert "cms-out" not in listed  # refused before it was registered
    fresh = tmp_path / "fresh.pem"
    one_line_error(  # an id already registered: refused, and no certificate left behind
        _add(id_dir, "--id", "polri-cms", "--csr", str(tmp_path / "cms.csr"), "--out", str(fresh)), 2
    )
    assert not fresh.exists()
    agreement = id_dir.path / "agreement.toml"
    kept = agreement.read_bytes()
    compose = ["agreement", "compose", "--party", str(id_dir.path / "party.toml")]
    compose += ["--party", str(my_dir.path / "party.toml"), "--out", str(agreement)]
    one_line_error(run(*compose), 2, "exists")
    assert agreement.read_bytes() == kept


def test_a_rotation_refused_for_a_wrong_passphrase_leaves_no_key_behind(
    pair: tuple[NodeDir, NodeDir],
) -> None:
    id_dir, _ = pair
    keys = id_dir.path / "keys"
    files, ring = sorted(keys.rglob("*.pem")), (keys / "keyring.json").read_bytes()
    wrong = "another-passphrase-" + PASSPHRASE[::-1]
    one_line_error(
        run("keys", "rotate", "--dir", str(id_dir.path), "--purpose", "signing", passphrase=wrong), 2
    )
    assert sorted(keys.rglob("*.pem")) == files
    assert (keys / "keyring.json").read_bytes() == ring


def test_the_demo_never_deletes_a_folder_that_is_not_its_own(tmp_path: Path) -> None:
    node = tmp_path / "node"
    node.mkdir()
    (node / "keys").mkdir()
    (node / "keys" / "kek.key").write_text("content keys")
    one_line_error(run("demo", "--workdir", str(node)), 2, "not deleting")
    assert (node / "keys" / "kek.key").read_text() == "content keys"


def test_init_in_a_folder_changes_nothing_a_symbolic_link_in_it_points_to(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o755)  # (whatever this process's umask)
    (outside / "tool").write_text("#!/bin/sh\n")
    (outside / "tool").chmod(0o755)
    target = tmp_path / "node"
    target.mkdir()
    (target / "link").symlink_to(outside, target_is_directory=True)
    proc = run("init", "--party", "ID", "--dir", str(target))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(outside.stat().st_mode) == 0o755
    assert stat.S_IMODE((outside / "tool").stat().st_mode) == 0o755
