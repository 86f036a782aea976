"""The JSON-line log format: the fields it writes, and what it never writes."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import pytest
import sqlalchemy as sa

from exchange.config import LogFormat
from exchange.errors import InvalidInput
from exchange.observability import logs, metrics


def record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    info = sys.exc_info() if exc else None
    rec = logging.LogRecord("exchange.delivery", logging.WARNING, __file__, 1, msg, args, info)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_a_line_is_one_json_object_with_the_named_fields_only() -> None:
    extra = logs.fields(
        logs.Event.ENVELOPE_REJECTED, message_id="m-1", rule_ids=["R-A", "R-B"], client_id="c"
    )
    rec = record("rejected %s", "m-1", **extra, payload={"summary": "secret"}, subject="CN=Jane Doe")
    token = logs.REQUEST_ID.set("req-1")
    try:
        doc = json.loads(logs.JsonFormatter().format(rec))
    finally:
        logs.REQUEST_ID.reset(token)
    assert doc["event"] == "envelope.rejected"
    assert doc["msg"] == "rejected m-1"
    assert doc["level"] == "warning"
    assert doc["time"].endswith("Z")
    assert (doc["message_id"], doc["rule_ids"], doc["client_id"], doc["request_id"]) == (
        "m-1",
        ["R-A", "R-B"],
        "c",
        "req-1",
    )
    assert "payload" not in doc
    assert "subject" not in doc
    assert "secret" not in json.dumps(doc)


def test_a_line_without_an_event_is_named_after_its_logger() -> None:
    doc = json.loads(logs.JsonFormatter().format(record("partner unavailable")))
    assert doc["event"] == "delivery"
    assert "request_id" not in doc


def test_an_unknown_field_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="not a log field"):
        logs.fields("x", payload="secret")


def test_a_library_exception_keeps_its_frames_but_not_its_message() -> None:
    quoted = "input_value='Victim Jane Doe, born 2012'"  # what pydantic's messages look like
    try:
        raise ValueError(quoted)
    except ValueError:
        doc = json.loads(logs.JsonFormatter().format(record("round failed", exc=True)))
    assert doc["error"].startswith("Traceback (most recent call last):")
    assert doc["error"].endswith("builtins.ValueError")
    assert "Jane" not in doc["error"]
    try:
        raise InvalidInput("--clearance must be one of [...]")
    except InvalidInput:
        text = logs.TextFormatter().format(record("bad input", exc=True))
    assert text.endswith("exchange.errors.InvalidInput: --clearance must be one of [...]")


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("0f4c2a", True),
        ("obs-req-0001", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("has space", False),
        ("line\nbreak", False),
        ('quote"d', False),
        ("-leading-dash", False),
        ("", False),
        (None, False),
    ],
)
def test_a_request_id_is_kept_only_if_well_formed(given: str | None, kept: bool) -> None:
    assert logs.well_formed_request_id(given) == (given if kept else None)


def test_a_security_incident_is_its_own_event_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    counter = metrics.SECURITY_INCIDENTS.labels("checkpoint")
    before = counter._value.get()
    log = logging.getLogger("exchange.checkpoints")
    with caplog.at_level(logging.ERROR, logger="exchange.checkpoints"):
        logs.security_incident(log, "checkpoint", "checkpoint %s at size %d: %s", "ID", 7, "rollback")
    (rec,) = caplog.records
    assert rec.getMessage() == "SECURITY INCIDENT: checkpoint ID at size 7: rollback"
    doc = json.loads(logs.JsonFormatter().format(rec))
    assert (doc["event"], doc["kind"], doc["level"]) == ("security.incident", "checkpoint", "error")
    assert counter._value.get() == before + 1


def test_the_logging_configuration_applies_in_both_formats() -> None:
    import logging.config

    formats: tuple[LogFormat, ...] = ("json", "text")
    for fmt in formats:
        config = logs.log_config(fmt, "info")
        logging.config.dictConfig({**config, "root": {"level": logging.WARNING, "handlers": []}})
    assert config["loggers"]["uvicorn.access"]["propagate"] is False


@pytest.mark.postgres
def test_a_postgresql_error_logged_as_text_loses_the_values_it_quotes(make_pg_database: Any) -> None:
    """PostgreSQL's DETAIL quotes the refused row ("Failing row contains (...)", "Key (...)=(...)
    already exists"), and psycopg puts it in the error's text. A line that formats such an error
    into its message, as text or as repr, or an ExchangeError quoting it, carries none of it, in
    either format; the error's first line (no values) stays."""
    from exchange.db.engine import make_engine
    from exchange.errors import ExchangeError

    canary = "CANARY-Siti-Rahayu-2012"
    engine = make_engine(make_pg_database())
    errors: list[sa.exc.DBAPIError] = []
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("create table person (name text primary key, born text not null)"))
            conn.execute(sa.text("insert into person values (:n, '2012')"), {"n": canary})
        for statement in (
            "insert into person values (:n, null)",  # DETAIL: Failing row contains (CANARY..., null).
            "insert into person values (:n, '2013')",  # DETAIL: Key (name)=(CANARY...) already exists.
        ):
            with pytest.raises(sa.exc.IntegrityError) as refused, engine.begin() as conn:
                conn.execute(sa.text(statement), {"n": canary})
            errors.append(refused.value)
    finally:
        engine.dispose()
    for error in errors:
        assert canary in str(error.orig)  # what the server said, which a careless line would log
        for rec in (
            record("insert failed: %s", error),
            record("insert failed: %r", error),
            record("insert failed: %s", error.orig),
        ):
            doc = json.loads(logs.JsonFormatter().format(rec))
            text = logs.TextFormatter().format(rec)
            for line in (doc["msg"], text):
                assert canary not in line
                assert "DETAIL: (withheld)" in line
                assert " violates " in line  # the server's first line stays
        try:
            raise ExchangeError(f"storing failed: {error}")
        except ExchangeError:
            rec = record("round failed", exc=True)
        assert canary not in json.loads(logs.JsonFormatter().format(rec))["error"]
        assert canary not in logs.TextFormatter().format(rec)


def test_a_detail_whose_values_hold_line_breaks_is_withheld_to_the_end() -> None:
    """A refused row's values may hold line breaks (a free-text field): nothing after DETAIL is kept."""
    text = (
        "insert failed: null value violates\n"
        "DETAIL:  Failing row contains (1, Victim Siti\nlives at Jl. Mawar 5, null).\n"
    )
    for written in (text, repr(text)):
        kept = logs.withhold_server_detail(written)
        assert "Siti" not in kept
        assert "Mawar" not in kept
        assert "violates" in kept
