"""The admin CLI: precise one-line errors and non-zero exits, never a stack trace."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import sqlalchemy as sa
import tomli_w

from exchange import crypto
from tests.support import PASSPHRASE, cli, make_pair, set_node_options


def run(*args: str, passphrase: str | None = PASSPHRASE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    if passphrase is not None:
        env["EXCHANGE_KEY_PASSPHRASE"] = passphrase
    return subprocess.run(
        [sys.executable, "-m", "exchange", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def pair(tmp_path: Path):  # type: ignore[no-untyped-def]
    return make_pair(tmp_path)


def test_serve_on_a_directory_that_is_not_a_node(tmp_path: Path) -> None:
    one_line_error(run("serve", "--dir", str(tmp_path)), 2, "not a node directory", "exchange init")


def test_init_refuses_a_weak_or_missing_passphrase(tmp_path: Path) -> None:
    one_line_error(
        run("init", "--party", "ID", "--dir", str(tmp_path / "n"), passphrase="changeme"), 2, "placeholder"
    )
    one_line_error(
        run("init", "--party", "ID", "--dir", str(tmp_path / "n"), passphrase="short"), 2, "12 characters"
    )
    one_line_error(
        run("init", "--party", "ID", "--dir", str(tmp_path / "n"), passphrase=None),
        2,
        "EXCHANGE_KEY_PASSPHRASE",
    )
    one_line_error(run("init", "--party", "XX", "--dir", str(tmp_path / "n")), 2, "--party")


def test_a_node_refuses_to_start_on_an_invalid_agreement_naming_the_fields(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _ = pair
    path = id_dir.path / "agreement.toml"
    data = tomllib.loads(path.read_text())
    data["schemes"]["POLRI"]["levels"]["RAHASIA"] = "SECRETISH"
    data["message_types"]["RESPONSE"]["purposes"].append("GOSSIP")
    path.write_text(tomli_w.dumps(data))
    one_line_error(run("serve", "--dir", str(id_dir.path)), 2, "schemes.POLRI.levels.RAHASIA", "GOSSIP")


def test_a_node_refuses_to_start_without_the_keys_its_key_set_makes_active(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    id_dir, _my_dir = pair
    path = id_dir.path / "agreement.toml"
    data = tomllib.loads(path.read_text())
    stranger = crypto.new_message_key("sig")
    key = crypto.public_jwk_dict(crypto.private_jwk(stranger, crypto.message_key_id("ID", "sig", stranger)))
    data["parties"]["ID"]["signing_keys"] = [key]
    path.write_text(tomli_w.dumps(data))
    one_line_error(
        run("serve", "--dir", str(id_dir.path)), 2, "signing key", "of key set version 1 is not held"
    )


def test_a_wrong_passphrase_is_refused_clearly(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _ = pair
    one_line_error(
        run("serve", "--dir", str(id_dir.path), passphrase="a-wrong-passphrase!"), 2, "wrong passphrase"
    )


def test_an_unmigrated_database_is_refused_with_the_command_to_run(tmp_path: Path) -> None:
    proc = run("init", "--party", "ID", "--dir", str(tmp_path / "n"))
    assert proc.returncode == 0, proc.stderr
    one_line_error(run("clients", "list", "--dir", str(tmp_path / "n")), 2, "exchange db upgrade")


def test_invalid_settings_are_named(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _ = pair
    path = id_dir.path / "node.toml"
    original = path.read_text()
    set_node_options(id_dir.path, listen_port=99999, max_body_bytes="lots", colour="blue")
    one_line_error(run("serve", "--dir", str(id_dir.path)), 2, "listen_port", "max_body_bytes", "colour")
    path.write_text(original + "listen_port = 1\n")  # a key twice: not TOML
    one_line_error(run("serve", "--dir", str(id_dir.path)), 2, "not valid TOML")


def test_clients_add_refuses_a_certificate_from_another_ca_and_a_bad_clearance(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    id_dir, _ = pair
    other = crypto.issue_certificate(
        crypto.make_ca("other", "other", PASSPHRASE),
        PASSPHRASE,
        kind="client",
        common_name="x",
        organisation="o",
        passphrase=PASSPHRASE,
    )
    (tmp_path / "other.pem").write_bytes(other.cert_pem)
    base = ["clients", "add", "--dir", str(id_dir.path), "--id", "x", "--agency", "a", "--unit", "TPPO"]
    base += ["--type", "ALL", "--purpose", "ALL"]
    one_line_error(
        run(*base, "--cert", str(tmp_path / "other.pem"), "--clearance", "RAHASIA"),
        2,
        "not issued by this node's certificate authority",
    )
    one_line_error(
        run(*base, "--cert", str(id_dir.client("polri-cms").cert), "--clearance", "SULIT"),
        2,
        "--clearance must be one of",
    )
    one_line_error(
        run(*base, "--cert", str(id_dir.client("polri-cms").cert), "--clearance", "RAHASIA"),
        2,
        "already has this id or certificate",
    )


def test_clients_add_takes_only_what_the_agreement_defines(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _ = pair
    cli(
        "pki",
        "issue-client",
        "--dir",
        str(id_dir.path),
        "--name",
        "new",
        "--out",
        str(id_dir.path / "clients"),
    )
    base = ["clients", "add", "--dir", str(id_dir.path), "--id", "new", "--agency", "Polri"]
    base += ["--cert", str(id_dir.client("new").cert), "--clearance", "RAHASIA"]
    entitled = ["--type", "ALL", "--purpose", "ALL"]
    one_line_error(run(*base, "--unit", "D7", *entitled), 2, "--unit must be one of")
    one_line_error(run(*base, "--unit", "TPPO", "--type", "GOSSIP", "--purpose", "ALL"), 2, "--type")
    one_line_error(run(*base, "--unit", "TPPO", "--type", "ALL", "--purpose", "FUN"), 2, "--purpose")
    one_line_error(run(*base, "--unit", "TPPO", *entitled, "--role", "SPY"), 2, "--role")
    one_line_error(run(*base, "--unit", "TPPO", *entitled, "--role", "ALL"), 2, "--role")
    assert "registered new" in cli(*base, "--unit", "TPPO", *entitled, "--role", "ANALYST")


def test_audit_verify_passes_then_names_the_first_tampered_entry(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _ = pair
    from exchange.db import repo
    from exchange.db.engine import Database
    from exchange.ledger import EntryDraft

    url = f"sqlite:///{id_dir.path / 'node.db'}"
    with Database(url) as db, db.transaction() as conn:
        head = repo.lock_ledger_head(conn)
        repo.append_ledger(conn, head, [EntryDraft(event=f"e{i}", decision="allow") for i in range(5)], "t")
    ok = run("audit", "verify", "--dir", str(id_dir.path))
    assert ok.returncode == 0, ok.stderr
    assert "5 entries" in ok.stdout
    engine = sa.create_engine(url)
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.execute(sa.text("update ledger_entries set decision = 'deny' where seq = 3"))
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.execute(sa.text("delete from ledger_entries where seq = 4"))
    with (
        engine.begin() as conn
    ):  # a database administrator can drop the triggers: verification still catches it
        for name in ("ledger_entries_no_update", "ledger_entries_no_delete"):
            conn.execute(sa.text(f"drop trigger {name}"))
        conn.execute(sa.text("update ledger_entries set decision = 'deny' where seq = 3"))
    one_line_error(run("audit", "verify", "--dir", str(id_dir.path)), 1, "entry 3")
    with engine.begin() as conn:
        conn.execute(sa.text("update ledger_entries set decision = 'allow' where seq = 3"))
        conn.execute(sa.text("delete from ledger_entries where seq = 4"))
    one_line_error(run("audit", "verify", "--dir", str(id_dir.path)), 1, "entry 4")
    engine.dispose()


def test_envelope_seal_and_open_work_on_jwk_files(tmp_path: Path) -> None:
    import json

    from tests.unit.test_envelope import ID_SIG, MY_ENC, message

    (tmp_path / "sk.json").write_text(json.dumps(ID_SIG.as_dict(private=True)))
    (tmp_path / "vk.json").write_text(json.dumps(ID_SIG.as_dict(private=False)))
    (tmp_path / "dk.json").write_text(json.dumps(MY_ENC.as_dict(private=True)))
    (tmp_path / "rk.json").write_text(json.dumps(MY_ENC.as_dict(private=False)))
    (tmp_path / "m.json").write_text(json.dumps(message()))
    sealed = run(
        "envelope",
        "seal",
        "--message",
        str(tmp_path / "m.json"),
        "--signing-key",
        str(tmp_path / "sk.json"),
        "--recipient-key",
        str(tmp_path / "rk.json"),
    )
    assert sealed.returncode == 0, sealed.stderr
    (tmp_path / "e.jwe").write_text(sealed.stdout)
    opened = run(
        "envelope",
        "open",
        "--envelope",
        str(tmp_path / "e.jwe"),
        "--decryption-key",
        str(tmp_path / "dk.json"),
        "--verification-key",
        str(tmp_path / "vk.json"),
    )
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["message"] == message()
    one_line_error(
        run(
            "envelope",
            "open",
            "--envelope",
            str(tmp_path / "e.jwe"),
            "--decryption-key",
            str(tmp_path / "rk.json"),
            "--verification-key",
            str(tmp_path / "vk.json"),
        ),
        2,
    )


def test_envelope_open_refuses_a_signed_payload_with_a_duplicate_member(tmp_path: Path) -> None:
    import json

    from tests.unit.test_envelope import CANONICAL, ID_SIG, MY_ENC, _wrap

    duplicated = CANONICAL.decode().replace('"tlp":"AMBER"', '"tlp":"RED","tlp":"AMBER"').encode()
    (tmp_path / "e.jwe").write_text(_wrap(duplicated))
    (tmp_path / "vk.json").write_text(json.dumps(ID_SIG.as_dict(private=False)))
    (tmp_path / "dk.json").write_text(json.dumps(MY_ENC.as_dict(private=True)))
    refused = run(
        "envelope",
        "open",
        "--envelope",
        str(tmp_path / "e.jwe"),
        "--decryption-key",
        str(tmp_path / "dk.json"),
        "--verification-key",
        str(tmp_path / "vk.json"),
    )
    one_line_error(refused, 2, "malformed", "duplicate member")


def test_audit_keys_prints_the_note_verifier_keys_the_agreement_pins(tmp_path: Path) -> None:
    from exchange.agreement import load_agreement

    id_dir, _ = make_pair(tmp_path)
    agreement = load_agreement(id_dir.path / "agreement.toml")
    out = run("audit", "keys", "--agreement", str(id_dir.path / "agreement.toml"))
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.strip().splitlines()]
    assert [(r[0], r[2]) for r in rows] == [
        ("ID", agreement.parties["ID"].ledger_verifier.vkey),
        ("ID", agreement.parties["ID"].witness_verifier.vkey),
        ("MY", agreement.parties["MY"].ledger_verifier.vkey),
        ("MY", agreement.parties["MY"].witness_verifier.vkey),
    ]
    assert agreement.parties["ID"].ledger_key == agreement.parties["ID"].ledger_verifier.vkey  # from init
    data = tomllib.loads((id_dir.path / "agreement.toml").read_text())
    data["parties"]["ID"]["ledger_key"] = agreement.parties["MY"].ledger_verifier.vkey
    (tmp_path / "wrong.toml").write_text(tomli_w.dumps(data))
    one_line_error(run("agreement", "check", str(tmp_path / "wrong.toml")), 2, "not the note key")
    one_line_error(run("audit", "keys"), 2, "--agreement")


def test_retention_run_and_overdue_requests_from_the_cli(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _ = pair
    first = run("retention", "run", "--dir", str(id_dir.path))
    assert first.returncode == 0, first.stderr
    assert "destroyed the content of 0 message(s)" in first.stdout
    overdue = run("requests", "overdue", "--dir", str(id_dir.path))
    assert overdue.returncode == 0, overdue.stderr
    assert "no overdue requests" in overdue.stdout
    one_line_error(run("retention", "run", "--dir", str(id_dir.path / "nowhere")), 2, "nowhere")


def test_keys_list_shows_both_nodes_keys_and_flags_what_expires_soon(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, my_dir = pair
    listed = run("keys", "list", "--dir", str(id_dir.path))
    assert listed.returncode == 0, listed.stderr
    ring = json.loads((id_dir.path / "keys" / "keyring.json").read_text())
    partner = tomllib.loads((my_dir.path / "party.toml").read_text())
    for kid in [k["kid"] for k in ring["keys"]] + [
        partner["signing_keys"][0]["kid"],
        partner["checkpoint_key"]["kid"],
    ]:
        assert kid in listed.stdout
    assert "TLS node.pem" in listed.stdout
    assert "EXPIRES SOON" not in listed.stdout
    assert "PRIVATE" not in listed.stdout
    set_node_options(id_dir.path, expiry_warning_days=100_000)  # everything expires "soon" now
    flagged = run("keys", "list", "--dir", str(id_dir.path))
    assert flagged.returncode == 0
    assert flagged.stdout.count("EXPIRES SOON") >= 3
    assert "warning:" in flagged.stderr


def test_keys_rotate_activate_revoke_from_the_cli_in_order_or_with_a_one_line_error(pair) -> None:  # type: ignore[no-untyped-def]
    id_dir, _ = pair
    where = ("--dir", str(id_dir.path))
    one_line_error(run("keys", "activate", *where, "--purpose", "signing"), 2, "no next signing key")
    one_line_error(run("keys", "rotate", *where, "--purpose", "sideways"), 2, "--purpose")
    rotated = run("keys", "rotate", *where, "--purpose", "signing", "--wait", "0")
    assert rotated.returncode == 0, rotated.stderr
    assert "next signing key ID-sig-" in rotated.stdout
    assert "not acknowledged yet" in rotated.stdout  # no node is running to announce it
    one_line_error(run("keys", "rotate", *where, "--purpose", "signing"), 2, "already next")
    one_line_error(run("keys", "activate", *where, "--purpose", "signing"), 2, "has not acknowledged")
    one_line_error(
        run("keys", "activate", *where, "--purpose", "signing", "--force"), 2, "--force is allowed only"
    )
    listed = run("keys", "list", *where)
    assert "version 2\tNOT YET ACKNOWLEDGED" in listed.stdout
    assert "\tnext\t" in listed.stdout
    encryption = next(
        line.split("\t")[2] for line in listed.stdout.splitlines() if "\tencryption key\t" in line
    )
    one_line_error(
        run("keys", "revoke", *where, encryption, "--reason", "x", "--effective-at", "noon"), 2, "ISO 8601"
    )
    one_line_error(
        run("keys", "revoke", *where, encryption, "--reason", "x", "--effective-at", "2026-11-23T10:00:00"),
        2,
        "time zone",
    )
    one_line_error(
        run("keys", "revoke", *where, "ID-enc-nothing", "--reason", "x"), 2, "not a key of this node"
    )
    revoked = run("keys", "revoke", *where, encryption, "--reason", "backup tape lost", "--wait", "0")
    assert revoked.returncode == 0, revoked.stderr
    assert f"{encryption} revoked from" in revoked.stdout
    assert "replaced at once by encryption key ID-enc-" in revoked.stdout
    assert not list((id_dir.path / "keys").glob(f"enc-{encryption}.pem"))
    one_line_error(run("keys", "revoke", *where, encryption, "--reason", "again"), 2, "already revoked")
    after = run("keys", "list", *where).stdout
    assert f"{encryption}\trevoked\tuntil {dt.datetime.now(dt.UTC).date().isoformat()}" in after
    assert "version 3\tNOT YET ACKNOWLEDGED" in after


def test_a_removed_client_s_id_is_never_given_to_another_system_once_it_acted(pair) -> None:  # type: ignore[no-untyped-def]
    """A message's sender, its idempotent answers and what may be done to it are keyed by the
    client id: a new system registered under a removed one's id would read the messages it sent
    and act on them. Once the ledger names the id, it is refused with a one-line reason; an id
    that never acted may be registered again."""
    from exchange.config import load_settings
    from exchange.node import Node
    from tests.integration.test_node_flow import actor
    from tests.integration.test_rules_flow import submit
    from tests.support import register_client, rfi

    id_dir, _ = pair
    register_client(id_dir, "idle-system", "RAHASIA")
    register_client(id_dir, "old-system", "RAHASIA")
    node = Node(load_settings(id_dir.path))
    try:
        submit(node, actor(node, id_dir, "old-system"), rfi())
    finally:
        node.close()
    for name in ("old-system", "idle-system"):
        cli("clients", "remove", "--dir", str(id_dir.path), "--id", name)
    cli(
        "pki",
        "issue-client",
        "--dir",
        str(id_dir.path),
        "--name",
        "newcomer",
        "--out",
        str(id_dir.path / "clients"),
    )
    add = ["clients", "add", "--dir", str(id_dir.path), "--agency", "Polri", "--unit", "TPPO"]
    add += ["--cert", str(id_dir.client("newcomer").cert), "--clearance", "TERBATAS"]
    add += ["--type", "ALL", "--purpose", "ALL"]
    one_line_error(
        run(*add, "--id", "old-system"), 2, "'old-system' was a removed client's", "choose another id"
    )
    assert "registered idle-system" in cli(*add, "--id", "idle-system")
