"""Two real nodes for the end-to-end tests: started once per module, stopped after. A node may run
further processes on the same directory and database (:meth:`Running.start_process`)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Generator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
import tomli_w

from exchange.client import ExchangeClient
from exchange.db.engine import normalise_url
from exchange.demo import NodeProcess, free_port
from tests.support import (
    CLIENT_PASSPHRASE,
    PASSPHRASE,
    ClientFiles,
    NodeDir,
    make_pair,
    set_node_options,
)


@dataclass
class Running:
    node: NodeDir
    process: NodeProcess
    client_files: ClientFiles

    def client(self, files: ClientFiles | None = None, port: int | None = None) -> ExchangeClient:
        """A client of this node's API (of the process on ``port``, default the node's port)."""
        f = files or self.client_files
        return ExchangeClient(
            self.node.url if port is None else f"https://127.0.0.1:{port}",
            ca_file=self.node.ca,
            cert_file=f.cert,
            key_file=f.key,
            key_password=CLIENT_PASSPHRASE,
        )

    def db(self) -> sa.Engine:
        url = tomllib.loads((self.node.path / "node.toml").read_text()).get("database_url")
        return sa.create_engine(normalise_url(url) if url else f"sqlite:///{self.node.path / 'node.db'}")

    def start_process(self, name: str, *args: str) -> tuple[NodeProcess, int]:
        """Another ``exchange serve`` of this node (same directory and database) on a free port,
        logging to ``name``.log; returns it, started and ready, and its port."""
        port = free_port()
        env = {**self.process.env, "EXCHANGE_LISTEN_PORT": str(port)}
        process = NodeProcess(self.node.path, env, lambda: self.client(port=port), args, f"{name}.log")
        process.start()
        process.wait_ready()
        return process, port

    def log_problems(self) -> list[str]:
        """Every ERROR or traceback line in the logs of this node's processes."""
        return [
            f"{log.name}: {line}"
            for log in sorted(self.node.path.glob("*.log"))
            for line in log.read_text().splitlines()
            if " ERROR " in line or line.startswith("ERROR") or "Traceback" in line
        ]

    def count_messages(self, message_id: str) -> int:
        engine = self.db()
        with engine.connect() as conn:
            n = conn.execute(
                sa.text("select count(*) from messages where id = :i"), {"i": message_id}
            ).scalar_one()
        engine.dispose()
        return int(n)


def start_nodes(
    tmp_path_factory: pytest.TempPathFactory,
    options: dict[str, object] | None = None,
    agreement: dict[str, object] | None = None,
    db_urls: tuple[str | None, str | None] = (None, None),
    serve_args: tuple[str, ...] = (),
) -> Generator[tuple[Running, Running], None, None]:
    """Two nodes over mutual TLS; ``options`` and ``agreement`` override node settings and agreement
    fields (the same agreement for both); ``serve_args`` are further options of ``exchange serve``."""
    root = tmp_path_factory.mktemp("e2e")
    mp = pytest.MonkeyPatch()
    mp.setenv("EXCHANGE_KEY_PASSPHRASE", PASSPHRASE)
    mp.setenv("EXCHANGE_CLIENT_KEY_PASSPHRASE", CLIENT_PASSPHRASE)
    id_dir, my_dir = make_pair(root, db_urls)
    for nd in (id_dir, my_dir):
        set_node_options(
            nd.path,
            **{
                "delivery_backoff_base_seconds": 0.1,
                "delivery_backoff_max_seconds": 0.5,
                "delivery_lease_seconds": 3.0,
                "checkpoint_interval_seconds": 0.5,
                "delivery_poll_seconds": 0.05,
                **(options or {}),
            },
        )
        if agreement:
            path = nd.path / "agreement.toml"
            path.write_text(tomli_w.dumps({**tomllib.loads(path.read_text()), **agreement}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    env["EXCHANGE_KEY_PASSPHRASE"] = PASSPHRASE
    running = []
    for nd, name in ((id_dir, "polri-cms"), (my_dir, "pdrm-d7")):
        files = nd.client(name)
        holder: dict[str, Running] = {}
        process = NodeProcess(nd.path, env, lambda h=holder: h["r"].client(), serve_args)  # type: ignore[misc]
        run = Running(nd, process, files)
        holder["r"] = run
        process.start()
        running.append(run)
    try:
        for run in running:
            run.process.wait_ready(90 if serve_args else 30)  # workers each start an interpreter
        yield running[0], running[1]
    finally:
        for run in running:
            run.process.stop()
        mp.undo()
