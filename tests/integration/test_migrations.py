"""The migrations, on SQLite and PostgreSQL: they build exactly the tables the code declares
(``exchange.db.schema``), and the newest one goes down and up again with rows in its tables."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from exchange.db import schema
from exchange.db.engine import alembic_config, current_revision, upgrade


def _differences(url: str) -> list[object]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return [d for d in compare_metadata(context, schema.metadata)]
    finally:
        engine.dispose()


def test_the_migrated_schema_is_the_declared_one(db_url: str) -> None:
    assert _differences(db_url) == []


def test_the_newest_migration_goes_down_and_up_with_sealed_words(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:  # a consent whose justification is kept only in its sealed request
            conn.execute(
                schema.consent_requests.insert(),
                {
                    "id": "r1",
                    "message_id": "m1",
                    "direction": "in",
                    "purposes": ["TIP_INVESTIGATION"],
                    "justification": None,
                    "status": "pending",
                    "requested_at": "2026-11-25T00:00:00+00:00",
                    "request_control_id": "c1",
                },
            )
        command.downgrade(alembic_config(db_url), "0014")
        assert current_revision(db_url) == "0014"
        upgrade(db_url)
        with engine.connect() as conn:
            (row,) = conn.execute(sa.text("select id, request_control_id from consent_requests")).all()
        assert tuple(row) == ("r1", None)  # the reference went with the column; the row stays
    finally:
        engine.dispose()
    assert _differences(db_url) == []


def test_0015_fills_a_sent_message_s_origin_from_its_client_s_registration(db_url: str) -> None:
    command.downgrade(alembic_config(db_url), "0014")
    engine = sa.create_engine(db_url)
    try:
        common = {
            "type": "REQUEST_FOR_INFORMATION",
            "case_ref": "ID-MY/2026/0001",
            "thread_id": "t",
            "sender": "ID",
            "recipient": "MY",
            "scheme": "ID-NSI",
            "level": "RAHASIA",
            "common_level": "S",
            "local_level": "RAHASIA",
            "tlp": "AMBER",
            "handling_codes": [],
            "purposes": [],
            "agreement_version": "1",
            "created_at": "2026-11-25T00:00:00+00:00",
            "status": "delivered",
            "envelope_sha256": "0" * 64,
            "updated_at": "2026-11-25T00:00:00+00:00",
            "addressed_to": [],
            "recipients": [],
            "subject_roles": [],
            "categories": [],
        }
        with engine.begin() as conn:
            conn.execute(
                schema.clients.insert(),
                {
                    "id": "polri-cms",
                    "cert_fingerprint": "f" * 64,
                    "agency": "Polri",
                    "unit": "TPPO",
                    "roles": [],
                    "clearance": "RAHASIA",
                    "message_types": [],
                    "purposes": [],
                    "created_at": "2026-11-25T00:00:00+00:00",
                    "cases": [],
                },
            )
            table = sa.table(
                "messages", *(sa.column(k) for k in ["id", "direction", "submitted_by", *common])
            )
            for mid, direction, by in (
                ("sent", "out", "polri-cms"),
                ("gone", "out", "removed"),
                ("got", "in", None),
            ):
                conn.execute(
                    table.insert(),
                    {
                        "id": mid,
                        "direction": direction,
                        "submitted_by": by,
                        **{k: _json(v) for k, v in common.items()},
                    },
                )
        upgrade(db_url)
        with engine.connect() as conn:
            found = conn.execute(
                sa.text("select id, origin_agency, origin_unit from messages order by id")
            ).all()
        # the removed client's message is left to the node's start (from its sealed content)
        assert [tuple(r) for r in found] == [
            ("gone", None, None),
            ("got", None, None),
            ("sent", "Polri", "TPPO"),
        ]
    finally:
        engine.dispose()


def _json(value: object) -> object:
    import json

    return json.dumps(value) if isinstance(value, list) else value
