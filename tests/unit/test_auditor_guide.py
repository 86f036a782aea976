"""The hand checks of docs/auditor.md, run exactly as written (public tools only) on the published
vectors and on a bundle: they accept what is genuine and refuse what was tampered with."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_bundle import bundle

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "auditor.md").read_text()
VECTORS = json.loads((ROOT / "schemas" / "vectors" / "ledger-v1.json").read_text())


def block(name: str) -> str:
    found = re.search(rf"<!-- guide:{name} -->\n```\w+\n(.*?)```", GUIDE, re.S)
    assert found, name
    return found.group(1)


def run_sh(script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env}
    )


def test_step_1_the_leaf_hash_is_sha256_of_0x00_and_the_leaf(tmp_path: Path) -> None:
    for leaf, expected in zip(VECTORS["leaves"], VECTORS["leaf_hashes"], strict=True):
        (tmp_path / "leaf.txt").write_bytes(leaf.encode())
        out = run_sh(block("leaf"), tmp_path)
        assert out.stdout.strip() == base64.b64decode(expected).hex()


def _inclusion(tmp_path: Path, data: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "inclusion.py").write_text(block("inclusion"))
    (tmp_path / "bundle.json").write_text(json.dumps(data))
    return subprocess.run(
        [sys.executable, "-I", "inclusion.py", "bundle.json"], cwd=tmp_path, capture_output=True, text=True
    )


def test_step_2_the_inclusion_script_accepts_a_bundle_and_refuses_an_altered_entry(tmp_path: Path) -> None:
    data = bundle(37, 5, 30, first=31)
    ok = _inclusion(tmp_path, data)
    assert ok.returncode == 0, ok.stderr
    assert "25 entries are in the tree of size 37" in ok.stdout
    data["entries"][7]["leaf"] = data["entries"][7]["leaf"].replace('"e"', '"f"')
    bad = _inclusion(tmp_path, data)
    assert bad.returncode != 0
    assert "entry 12 is NOT in the tree" in bad.stderr


def _checkpoint_steps(tmp_path: Path, note: str, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "checkpoint.txt").write_bytes(note.encode())
    script = block("checkpoint") + block("cosignature")
    return run_sh(script, tmp_path, LANG="C.UTF-8", **env)


def test_steps_3_and_4_verify_the_checkpoint_and_its_cosignature_with_openssl(tmp_path: Path) -> None:
    keys = {"LOG_VKEY": VECTORS["keys"]["log"]["vkey"], "WITNESS_VKEY": VECTORS["keys"]["witness"]["vkey"]}
    note = VECTORS["cosignature"]["cosigned_checkpoint"]
    ok = _checkpoint_steps(tmp_path, note, **keys)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("Signature Verified Successfully") == 2
    assert "cosigned at 2026-11-18T" in ok.stdout  # 1 795 000 000


@pytest.mark.parametrize(
    "tamper",
    [
        lambda n: n.replace("\n7\n", "\n8\n", 1),  # another size under the same signatures
        lambda n: n.replace("\n\n", "\nextension\n\n", 1),  # an extension line slipped in
        lambda n: n.replace("m4QzrAAAAABq", "m4QzrAAAAABr", 1),  # another cosignature timestamp
    ],
)
def test_steps_3_and_4_refuse_a_tampered_checkpoint(tmp_path: Path, tamper: Any) -> None:
    keys = {"LOG_VKEY": VECTORS["keys"]["log"]["vkey"], "WITNESS_VKEY": VECTORS["keys"]["witness"]["vkey"]}
    note = tamper(VECTORS["cosignature"]["cosigned_checkpoint"])
    assert note != VECTORS["cosignature"]["cosigned_checkpoint"]
    bad = _checkpoint_steps(tmp_path, note, **keys)
    assert bad.returncode != 0
    assert "Signature Verification Failure" in bad.stdout + bad.stderr
