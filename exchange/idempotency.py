"""Safely retryable submissions: the ``Idempotency-Key`` request header.

A local system whose connection drops after the node accepted its message cannot know whether it
was accepted. It sends the same request again with the same ``Idempotency-Key`` and gets:

- the original answer (and no second message), if the key was used before with the same body;
- a 422 problem (:class:`~exchange.errors.IdempotencyKeyReused`), if the key was used with another
  body;
- a normal submission otherwise.

The request is kept only as a keyed digest (HMAC-SHA256 under a key derived from the node's master
key): the database alone does not tell whether a guessed submission, a name in it say, was made.

Keys are per client (one client cannot learn or replay another's), stored with the original answer
in the very transaction that writes the message they name (``Node.submit``'s ``on_write``), so a key
exists if and only if its message does, whatever crashes. Two concurrent requests with one key are
serialised by that write: the second finds the key under the ledger lock and answers like a retry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
from typing import Any

from sqlalchemy.engine import Connection

from exchange.canonical import sha256_hex
from exchange.db import idempotency_keys
from exchange.errors import FieldError, IdempotencyKeyReused, InvalidInput
from exchange.messages import MessageSubmission
from exchange.node import Node, iso
from exchange.policy import Actor

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 128
_KEY = re.compile(r"^[\x21-\x7e]{1," + str(MAX_KEY_LENGTH) + r"}$")


def check_key(key: str) -> str:
    """Return ``key`` if it is 1 to 128 visible ASCII characters.

    Raises:
        InvalidInput: naming the header.
    """
    if not _KEY.match(key):
        raise InvalidInput(
            f"invalid {HEADER}",
            [FieldError(HEADER, f"must be 1 to {MAX_KEY_LENGTH} visible ASCII characters")],
        )
    return key


#: the label of the key that keys the request digests (exchange.keys.kek.KekStore.derived_key)
DIGEST_KEY_PURPOSE = b"exchange idempotency request digest v1"


def _canonical(submission: MessageSubmission) -> bytes:
    body = submission.model_dump(mode="json")
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def request_digest(submission: MessageSubmission, key: bytes) -> str:
    """HMAC-SHA256 under ``key`` of the submission as parsed: the same JSON body, whatever its key
    order or spacing, gives the same digest; without ``key`` it cannot be recomputed."""
    return hmac.new(key, _canonical(submission), hashlib.sha256).hexdigest()


def legacy_request_digest(submission: MessageSubmission) -> str:
    """The plain SHA-256 that keys stored before the keyed digest hold (compared, never written)."""
    return sha256_hex(_canonical(submission).decode())


class _Raced(Exception):
    """Another request with the same key committed first (raised inside the write: nothing is
    written)."""

    def __init__(self, row: idempotency_keys.KeyRow) -> None:
        super().__init__("idempotency key already used")
        self.row = row


class IdempotentSubmission:
    """Submission through ``Node.submit`` with an optional idempotency key."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def submit(
        self, actor: Actor, submission: MessageSubmission, key: str | None, now: dt.datetime
    ) -> tuple[dict[str, Any], bool]:
        """Submit, or replay the answer to an earlier request with the same key and body.

        Returns the answer and whether it is a replay.

        Raises:
            InvalidInput: the key is malformed, or as ``Node.submit``.
            IdempotencyKeyReused: the key was used before with another body.
            PolicyRefusal, MessageTooLarge: as ``Node.submit`` (nothing is stored for the key, so
                a retry is judged again).
        """
        if key is None:
            return self.node.submit(actor, submission, now), False
        check_key(key)
        digest = request_digest(submission, self.node.content.keks.derived_key(DIGEST_KEY_PURPOSE))
        with self.node.db.read() as conn:
            prior = idempotency_keys.get(conn, actor.client_id, key)
        if prior is not None:
            return self._replay(prior, submission, digest), True

        def record(conn: Connection, answer: dict[str, Any]) -> None:
            raced = idempotency_keys.get(conn, actor.client_id, key)
            if raced is not None:
                raise _Raced(raced)
            idempotency_keys.insert(
                conn,
                client_id=actor.client_id,
                key=key,
                request_sha256=digest,
                message_id=str(answer["id"]),
                response=json.dumps(answer),
                at=iso(now),
            )

        try:
            return self.node.submit(actor, submission, now, on_write=record), False
        except _Raced as raced:
            return self._replay(raced.row, submission, digest), True

    def _replay(
        self, prior: idempotency_keys.KeyRow, submission: MessageSubmission, digest: str
    ) -> dict[str, Any]:
        same = hmac.compare_digest(prior.request_sha256, digest) or hmac.compare_digest(
            prior.request_sha256, legacy_request_digest(submission)
        )
        if not same:
            raise IdempotencyKeyReused(
                f"this {HEADER} was already used for a different request (message {prior.message_id})",
                [FieldError(HEADER, "already used with a different body: use a new key")],
            )
        answer: dict[str, Any] = json.loads(prior.response)
        return answer
