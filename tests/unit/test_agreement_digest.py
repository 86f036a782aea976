"""The agreement digest is computable from the file with public tools (schemas/agreement-digest.md);
the further witnesses the agreement names are checked when it is loaded."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from exchange.agreement import load_agreement
from exchange.errors import ConfigurationError
from tests.unit.helpers import agreement_data

#: The commands schemas/agreement-digest.md shows, verbatim.
WITH_RFC8785 = (
    "import hashlib,sys,tomllib,rfc8785; "
    'print(hashlib.sha256(rfc8785.dumps(tomllib.load(open(sys.argv[1],"rb")))).hexdigest())'
)
STDLIB_ONLY = (
    "import hashlib,json,sys,tomllib; "
    'd=tomllib.load(open(sys.argv[1],"rb")); '
    'print(hashlib.sha256(json.dumps(d,sort_keys=True,separators=(",",":"),ensure_ascii=False)'
    ".encode()).hexdigest())"
)


def write(tmp_path: Path, text: str, name: str = "agreement.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_python(program: str, path: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", program, str(path)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_the_digest_is_sha256_of_the_rfc8785_form_of_the_file_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, tomli_w.dumps(agreement_data(), multiline_strings=True))
    digest = load_agreement(path).digest
    assert run_python(WITH_RFC8785, path) == digest
    assert run_python(STDLIB_ONLY, path) == digest  # equal for agreements without floats or astral keys


def test_formatting_does_not_change_the_digest_but_any_value_or_added_default_does(tmp_path: Path) -> None:
    data = agreement_data()
    base = load_agreement(write(tmp_path, tomli_w.dumps(data))).digest
    reordered = dict(reversed(list(data.items())))
    assert load_agreement(write(tmp_path, tomli_w.dumps(reordered, indent=8), "b.toml")).digest == base
    data["title"] += "."
    assert load_agreement(write(tmp_path, tomli_w.dumps(data), "c.toml")).digest != base
    data = agreement_data()
    data["tlp"] = ["CLEAR", "GREEN", "AMBER", "AMBER+STRICT", "RED"]  # the default, now written out
    assert load_agreement(write(tmp_path, tomli_w.dumps(data), "d.toml")).digest != base


def test_an_agreement_with_a_toml_date_is_refused(tmp_path: Path) -> None:
    text = tomli_w.dumps(agreement_data()) + "\nsigned_on = 2026-11-23\n"
    with pytest.raises(ConfigurationError, match="dates or times"):
        load_agreement(write(tmp_path, text))


def test_the_digest_is_what_json_tools_see() -> None:
    data = agreement_data()
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    from exchange.agreement import parse_agreement

    assert parse_agreement(data).digest == hashlib.sha256(text.encode()).hexdigest()


def test_a_further_witness_must_have_a_cosignature_key_of_its_own_name() -> None:
    from exchange.agreement import parse_agreement

    data = agreement_data()
    vkey = "w.example/1+" + "00" * 4 + "+" + "B" + "A" * 43
    good = _witness_vkey("w.example/1")
    data["witnesses"] = [{"name": "w.example/1", "key": good, "url": "https://w.example"}]
    assert parse_agreement(data).witnesses[0].verifier.vkey == good
    for bad, needle in (
        ({"name": "w.example/2", "key": good, "url": "https://w.example"}, "not the witness"),
        ({"name": "w.example/1", "key": vkey, "url": "https://w.example"}, "key id"),
        ({"name": "w.example/1", "key": good, "url": "ftp://w.example"}, "url"),
        (
            {"name": "ID-node/witness", "key": _witness_vkey("ID-node/witness"), "url": "https://x"},
            "distinct",
        ),
    ):
        data["witnesses"] = [bad]
        with pytest.raises(ConfigurationError, match=needle):
            parse_agreement(data)
    log_key = parse_agreement(agreement_data()).parties["ID"].ledger_verifier.vkey  # type 0x01
    data["witnesses"] = [{"name": "ID-node/ledger", "key": log_key, "url": "https://x"}]
    with pytest.raises(ConfigurationError, match="cosignature/v1"):
        parse_agreement(data)


def _witness_vkey(name: str) -> str:
    from exchange import crypto
    from exchange.ledger.checkpoint import SIG_COSIGNATURE_V1, NoteVerifier

    return NoteVerifier.of(
        name, crypto.private_jwk(crypto.new_message_key("ckpt"), "w"), SIG_COSIGNATURE_V1
    ).vkey
