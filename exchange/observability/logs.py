"""Logs as JSON lines (or human text), with a request id per API request.

A JSON line is one object: ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``event``, ``msg`` (the
rendered text) and, when known, ``request_id``, ``message_id``, ``rule_ids``, ``client_id`` and the
few other fields named in :data:`FIELDS`. Nothing else a caller passes in ``extra`` is written, so a
stray value cannot leak through the formatter.

Invariants the call sites keep and the tests check: a log line never holds message content (no
payload, no summary, no free text from a message) nor the identity of a person (no victim, witness
or informant; of a caller only its registered client id, never its certificate subject). A stack
trace keeps its frames but, for an exception that is not one of ours, only the exception's type:
a library's message can quote the data it choked on. PostgreSQL's own ``DETAIL`` and ``CONTEXT``
parts of an error (``Failing row contains (...)``, ``Key (case_ref)=(...) already exists``) quote a
row's values, so a line never carries them, whoever formatted the error into its text
(:func:`withhold_server_detail`).

Security incidents are the distinct event ``security.incident`` (:func:`security_incident`), so an
operator can alert on the event rather than on a phrase.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.config
import re
import traceback
from collections.abc import Iterable
from contextvars import ContextVar
from enum import StrEnum
from types import TracebackType
from typing import Any

from exchange.config import LogFormat
from exchange.errors import ExchangeError
from exchange.observability import metrics

#: the API request being served by this thread or task, if any
REQUEST_ID: ContextVar[str | None] = ContextVar("exchange_request_id", default=None)
#: what an X-Request-ID from a caller may be: visible ASCII without spaces or quotes, 1-128 characters
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")

#: the fields a JSON line may carry besides time, level, logger, event, msg and request_id
FIELDS = (
    "message_id",
    "rule_ids",
    "client_id",
    "kind",
    "method",
    "route",
    "status",
    "duration_ms",
)

#: levels of ``log_level`` (uvicorn's names; ``trace`` is below debug)
LEVELS = {"critical": 50, "error": 40, "warning": 30, "info": 20, "debug": 10, "trace": 5}


class Event(StrEnum):
    """Events a log line names explicitly; any other line's event is its logger's name."""

    SECURITY_INCIDENT = "security.incident"
    POLICY_INCIDENT = "policy.incident"
    ENVELOPE_REJECTED = "envelope.rejected"
    MESSAGE_ACCEPTED = "message.accepted"
    POLICY_REFUSED = "policy.refused"
    HTTP_REQUEST = "http.request"


def well_formed_request_id(value: str | None) -> str | None:
    """``value`` if it may serve as a request id (:data:`REQUEST_ID_PATTERN`), else None."""
    return value if value is not None and REQUEST_ID_PATTERN.fullmatch(value) else None


def fields(
    event: Event | str,
    *,
    message_id: str | None = None,
    rule_ids: Iterable[str] = (),
    **more: str | int | float | None,
) -> dict[str, Any]:
    """The ``extra`` of a log call: its event and structured fields (only :data:`FIELDS` are kept).

    Raises:
        ValueError: a field outside :data:`FIELDS` (a programming error, caught by the tests).
    """
    unknown = set(more) - set(FIELDS)
    if unknown:
        raise ValueError(f"not a log field: {sorted(unknown)}")
    extra: dict[str, Any] = {"event": str(event), **{k: v for k, v in more.items() if v is not None}}
    if message_id is not None:
        extra["message_id"] = message_id
    rules = list(rule_ids)
    if rules:
        extra["rule_ids"] = rules
    return extra


def security_incident(
    logger: logging.Logger, kind: str, template: str, *args: object, message_id: str | None = None
) -> None:
    """Log a security incident (event ``security.incident``, level error, the text beginning
    ``SECURITY INCIDENT``) and count it in ``exchange_security_incidents_total{kind}``. ``kind`` is a
    short code (``checkpoint``, ``partner-notified``, ``onward-without-consent``, ``key-receipt``,
    ``key-sets``, ``agreement``)."""
    metrics.security_incident(kind)
    logger.error(
        "SECURITY INCIDENT: " + template,
        *args,
        extra=fields(Event.SECURITY_INCIDENT, message_id=message_id, kind=kind),
    )


#: a part of a PostgreSQL error that quotes values, up to the end of the text: a quoted value may
#: itself hold line breaks, so no line end is taken for the end of the part
_SERVER_DETAIL = re.compile(r"(DETAIL|CONTEXT):.*", re.DOTALL)


def withhold_server_detail(text: str) -> str:
    """``text`` up to the first ``DETAIL`` or ``CONTEXT`` part of a PostgreSQL error, then
    ``DETAIL: (withheld)``: they quote the values of the row at fault (a case reference, a name),
    which may hold line breaks, so everything after is withheld."""
    if "DETAIL:" not in text and "CONTEXT:" not in text:
        return text
    return _SERVER_DETAIL.sub(lambda m: f"{m.group(1)}: (withheld)", text)


def exception_text(exc_info: tuple[type[BaseException], BaseException, TracebackType | None]) -> str:
    """A stack trace whose last line is the exception's type, and its message only if it is one of
    ours (an ExchangeError says nothing of content); a library's message may quote the data."""
    etype, value, tb = exc_info
    frames = "".join(traceback.format_tb(tb))
    name = f"{etype.__module__}.{etype.__qualname__}"
    detail = f": {withhold_server_detail(str(value))}" if isinstance(value, ExchangeError) else ""
    return f"Traceback (most recent call last):\n{frames}{name}{detail}"


def _event_of(record: logging.LogRecord) -> str:
    explicit = getattr(record, "event", None)
    if isinstance(explicit, str):
        return explicit
    if record.name.startswith("exchange."):
        return record.name.removeprefix("exchange.")
    return "server" if record.name.startswith("uvicorn") else record.name


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the fields described in this module's docstring."""

    def format(self, record: logging.LogRecord) -> str:
        at = dt.datetime.fromtimestamp(record.created, dt.UTC)
        doc: dict[str, Any] = {
            "time": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": _event_of(record),
            "msg": withhold_server_detail(record.getMessage()),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            doc["request_id"] = request_id
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            doc["error"] = exception_text(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Human lines: time, level, logger, text, then the request id and structured fields if any."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = withhold_server_detail(super().format(record))
        parts = [f"request_id={REQUEST_ID.get()}"] if REQUEST_ID.get() else []
        parts += [f"{n}={getattr(record, n)}" for n in FIELDS if getattr(record, n, None) is not None]
        return f"{line} [{' '.join(parts)}]" if parts else line

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return exception_text(ei)


def log_config(log_format: LogFormat, level: str) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` for a node process (uvicorn's ``log_config`` too, so
    every worker process applies it): every record to stderr in ``log_format``; uvicorn's access
    log off (the API logs ``http.request`` itself, with the route template rather than the raw path,
    and the request id)."""
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    numeric = LEVELS.get(level, logging.INFO)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"node": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "node", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": numeric},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True, "level": numeric},
            "uvicorn.error": {"handlers": [], "propagate": True, "level": numeric},
            "uvicorn.access": {"handlers": [], "propagate": False, "level": logging.WARNING},
            "alembic": {"level": logging.WARNING},
        },
    }


def configure(log_format: LogFormat, level: str) -> None:
    """Apply :func:`log_config` to this process."""
    logging.config.dictConfig(log_config(log_format, level))
