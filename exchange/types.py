"""Identifier types used across the project."""

from __future__ import annotations

from typing import Literal, NewType

MessageId = NewType("MessageId", str)
KeyId = NewType("KeyId", str)
ClientId = NewType("ClientId", str)
PartyId = Literal["ID", "MY"]
PARTIES: tuple[PartyId, ...] = ("ID", "MY")
