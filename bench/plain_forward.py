"""A plain store-and-forward gateway pair: the benchmark's baseline, never used by a node.

Same parts as a real node where it matters for cost (uvicorn with httptools and uvloop over mutual
TLS, the same pydantic and JSON-Schema validation, SQLAlchemy on SQLite in WAL or on PostgreSQL, a
batched outbox drained by one keep-alive sync httpx client) but no signing, no encryption, no
ledger, no receipts.

    python bench/plain_forward.py serve --db A.db|URL --port P --partner https://127.0.0.1:Q --tls DIR
"""

from __future__ import annotations

import argparse
import datetime as dt
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI

from exchange.agreement import load_agreement
from exchange.api.tls import TLSHttpToolsProtocol
from exchange.db.engine import make_engine
from exchange.errors import InvalidInput
from exchange.messages import Catalogue, MessageSubmission
from exchange.transport.peer import client_ssl_context

meta = sa.MetaData()
rows = sa.Table(
    "plain_messages",
    meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def build(db_url: str, partner: str, ctx: ssl.SSLContext, agreement_file: Path) -> FastAPI:
    engine = make_engine(db_url, pool_size=16)  # as a node's pool (database_pool_size)
    meta.create_all(engine)
    agreement = load_agreement(agreement_file)
    catalogue = Catalogue.for_agreement(agreement)
    wake = threading.Event()
    stop = threading.Event()
    app = FastAPI()

    @app.post("/v1/messages", status_code=202)
    def submit(submission: MessageSubmission) -> dict[str, Any]:
        errors = catalogue.payload_errors(submission.type, submission.payload)
        if errors:
            raise InvalidInput("the payload is invalid", errors)
        mid = str(uuid.uuid4())
        t = now_iso()
        with engine.begin() as conn:
            conn.execute(
                rows.insert().values(
                    id=mid, body=submission.model_dump_json(), status="queued", created_at=t, updated_at=t
                )
            )
        wake.set()
        return {"id": mid, "status": "queued"}

    @app.post("/forward")
    def forward(batch: dict[str, list[dict[str, str]]]) -> dict[str, int]:
        t = now_iso()
        with engine.begin() as conn:
            conn.execute(
                rows.insert(),
                [
                    {"id": m["id"], "body": m["body"], "status": "received", "created_at": t, "updated_at": t}
                    for m in batch["messages"]
                ],
            )
        return {"stored": len(batch["messages"])}

    def forwarder() -> None:
        client = httpx.Client(base_url=partner, verify=ctx, timeout=10)
        while not stop.is_set():
            with engine.begin() as conn:
                due = conn.execute(
                    sa.select(rows.c.id, rows.c.body)
                    .where(rows.c.status == "queued")
                    .order_by(rows.c.created_at)
                    .limit(64)
                ).all()
            if not due:
                wake.wait(0.2)
                wake.clear()
                continue
            try:
                client.post(
                    "/forward", json={"messages": [{"id": r.id, "body": r.body} for r in due]}
                ).raise_for_status()
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            with engine.begin() as conn:
                conn.execute(
                    rows.update()
                    .where(rows.c.id.in_([r.id for r in due]))
                    .values(status="delivered", updated_at=now_iso())
                )
        client.close()

    threading.Thread(target=forwarder, daemon=True).start()
    app.router.on_shutdown.append(stop.set)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("serve")
    parser.add_argument("--db", required=True, help="a SQLite file, or a database URL")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--partner", required=True)
    parser.add_argument("--node-dir", required=True, help="a real node directory, for its TLS files")
    parser.add_argument("--partner-dir", required=True)
    parser.add_argument("--passphrase", required=True)
    args = parser.parse_args()
    tls, partner_tls = Path(args.node_dir) / "tls", Path(args.partner_dir) / "tls"
    ctx = client_ssl_context(
        ca_file=partner_tls / "ca.pem",
        cert_file=tls / "node.pem",
        key_file=tls / "node-key.pem",
        key_password=args.passphrase,
    )
    bundle = Path(args.node_dir) / "plain-forward-bundle.pem"
    bundle.write_text((tls / "ca.pem").read_text() + (partner_tls / "ca.pem").read_text())
    url = args.db if "://" in args.db else f"sqlite:///{args.db}"
    app = build(url, args.partner, ctx, Path(args.node_dir) / "agreement.toml")
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        http=TLSHttpToolsProtocol,
        loop="uvloop",
        log_level="warning",
        ssl_certfile=str(tls / "server.pem"),
        ssl_keyfile=str(tls / "server-key.pem"),
        ssl_keyfile_password=args.passphrase,
        ssl_ca_certs=str(bundle),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
        proxy_headers=False,  # as a node's server (exchange/api/server.py)
    )


if __name__ == "__main__":
    main()
