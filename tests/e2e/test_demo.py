"""`make demo` runs `exchange demo`: it must pass from scratch, twice in a row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_the_demo_passes_twice_in_a_row(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "exchange", "demo", "--workdir", str(tmp_path / "demo")],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        assert "== Demo passed" in out
        assert "equivalent in Indonesia      RAHASIA" in out
        assert "VICTIM_SUPPORT accepted by ID, delivered to and verified by MY" in out  # a new agreement
        assert out.count("ledger verified") == 2
    key_files = [p for p in (tmp_path / "demo").rglob("*.pem") if "PRIVATE KEY" in p.read_text()]
    assert len(key_files) >= 12  # per node: 2 message keys, CA, server, node, one client
    for path in key_files:
        assert "-----BEGIN ENCRYPTED PRIVATE KEY-----" in path.read_text(), path
