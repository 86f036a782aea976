"""Builders shared by the tests: real node directories made through the real CLI."""

from __future__ import annotations

import secrets
import shutil
import socket
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from typer.testing import CliRunner

from exchange.cli import app

PASSPHRASE = "tests-" + secrets.token_urlsafe(18)  # generated per run, never stored
CLIENT_PASSPHRASE = "client-" + secrets.token_urlsafe(18)  # local systems' keys have their own
RUNNER = CliRunner()


def cli(*args: str) -> str:
    """Run a CLI command in-process; fail the test with its output if it does not succeed."""
    result = RUNNER.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ClientFiles:
    name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeDir:
    party: str
    path: Path
    port: int

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.path / "tls" / "ca.pem"

    def client(self, name: str) -> ClientFiles:
        return ClientFiles(
            name, self.path / "clients" / f"{name}.pem", self.path / "clients" / f"{name}-key.pem"
        )


def set_node_options(node: Path, **values: object) -> None:
    data = tomllib.loads((node / "node.toml").read_text())
    data.update(values)
    (node / "node.toml").write_text(tomli_w.dumps(data))


def make_pair(
    root: Path,
    db_urls: Sequence[str | None] = (None, None),
    clients: Sequence[tuple[str, str, str]] = (("ID", "polri-cms", "RAHASIA"), ("MY", "pdrm-d7", "RAHSIA")),
) -> tuple[NodeDir, NodeDir]:
    """Two initialised, migrated nodes sharing one agreement, each with registered clients.

    ``clients`` lists (party, name, clearance); requires EXCHANGE_KEY_PASSPHRASE to be set.
    """
    nodes = []
    for party, url in zip(("ID", "MY"), db_urls, strict=True):
        port = free_port()
        path = root / party.lower()
        cli("init", "--party", party, "--dir", str(path), "--port", str(port))
        if url:
            set_node_options(path, database_url=url)
        nodes.append(NodeDir(party, path, port))
    cli(
        "agreement",
        "compose",
        "--party",
        str(nodes[0].path / "party.toml"),
        "--party",
        str(nodes[1].path / "party.toml"),
        "--out",
        str(root / "agreement.toml"),
    )
    for node in nodes:
        shutil.copy(root / "agreement.toml", node.path / "agreement.toml")
        cli("db", "upgrade", "--dir", str(node.path))
    for party, name, clearance in clients:
        node = nodes[0] if party == "ID" else nodes[1]
        register_client(node, name, clearance)
    return nodes[0], nodes[1]


def register_client(node: NodeDir, name: str, clearance: str, *extra: str) -> ClientFiles:
    cli("pki", "issue-client", "--dir", str(node.path), "--name", name, "--out", str(node.path / "clients"))
    files = node.client(name)
    cli(
        "clients",
        "add",
        "--dir",
        str(node.path),
        "--id",
        name,
        "--cert",
        str(files.cert),
        "--agency",
        "Polri" if node.party == "ID" else "PDRM",
        "--unit",
        "TPPO",
        "--clearance",
        clearance,
        *extra,
    )
    return files


def rfi(**overrides: object) -> dict[str, object]:
    """A valid REQUEST_FOR_INFORMATION submission from Indonesia."""
    body: dict[str, object] = {
        "type": "REQUEST_FOR_INFORMATION",
        "case_ref": "ID-MY/2026/0001",
        "purposes": ["TIP_INVESTIGATION"],
        "classification": {"scheme": "POLRI", "level": "RAHASIA"},
        "tlp": "AMBER",
        "handling_codes": ["H0"],
        "payload": {"summary": "Recruiters moving workers via Batam", "questions": ["Known to PDRM?"]},
    }
    body.update(overrides)
    return body


def response_to(message_id: str, **overrides: object) -> dict[str, object]:
    """A valid RESPONSE from Malaysia to ``message_id``."""
    body: dict[str, object] = {
        "type": "RESPONSE",
        "case_ref": "ID-MY/2026/0001",
        "in_reply_to": message_id,
        "purposes": ["TIP_INVESTIGATION"],
        "classification": {"scheme": "ARAHAN", "level": "SULIT"},
        "tlp": "AMBER",
        "payload": {"outcome": "ANSWERED", "answers": [{"question": 0, "answer": "Yes, since March."}]},
    }
    body.update(overrides)
    return body
