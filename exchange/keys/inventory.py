"""What keys and certificates a node holds, and which expire soon: for ``exchange keys list``.

Reads both parties' key sets in force, the KEK file names, the TLS certificates and the expiry
recorded for each local system's certificate (``/healthz`` reports the TLS certificates through
:func:`tls_certificates`). Never reads or prints private key material.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from exchange import crypto
from exchange.agreement import Agreement
from exchange.errors import ExchangeError
from exchange.keys.kek import KekStore
from exchange.keys.registry import KeyHistory
from exchange.types import PartyId

CERTIFICATES = ("ca.pem", "server.pem", "node.pem", "partner-ca.pem")


@dataclass(frozen=True)
class KeyLine:
    """One key or certificate: whose, what, its id, its state and when it expires (if it does)."""

    owner: str
    kind: str
    ident: str
    state: str
    expires: dt.datetime | None
    expiring: bool

    def render(self) -> str:
        until = self.expires.date().isoformat() if self.expires else "-"
        flag = "\tEXPIRES SOON" if self.expiring else ""
        return f"{self.owner}\t{self.kind}\t{self.ident}\t{self.state}\tuntil {until}{flag}"


@dataclass(frozen=True)
class ClientCertificate:
    """What the node records of a local system's certificate (the certificate itself is the client's)."""

    client_id: str
    not_after: str | None  # ISO 8601; None for a client registered before migration 0012
    previous_until: str | None  # the replaced certificate is accepted until then


def tls_certificates(tls_dir: Path, agreement: Agreement, party: PartyId, soon: dt.datetime) -> list[KeyLine]:
    """The node's TLS certificates (CA, server, node-to-node, partner CA) present in ``tls_dir``,
    flagged when they expire by ``soon``; an unreadable one is flagged too. Never raises for a file."""
    lines = []
    for name in CERTIFICATES:
        path = tls_dir / name
        try:
            info = crypto.certificate_info(path.read_bytes())
        except FileNotFoundError:
            continue
        except (OSError, ExchangeError):
            lines.append(KeyLine(party, f"TLS {name}", "(unreadable)", "invalid", None, True))
            continue
        owner = agreement.partner_of(party) if name == "partner-ca.pem" else party
        lines.append(
            KeyLine(
                owner, f"TLS {name}", info.common_name, "certificate", info.not_after, info.not_after <= soon
            )
        )
    return lines


def key_inventory(
    *,
    key_dir: Path,
    tls_dir: Path,
    agreement: Agreement,
    own: KeyHistory,
    partner: KeyHistory,
    acknowledged: dict[int, str | None],
    now: dt.datetime,
    warn_days: int,
    clients: Sequence[ClientCertificate] = (),
) -> list[KeyLine]:
    """Every key of both parties' key sets in force (with the set's version and, for ours, whether
    the partner acknowledged it), this node's KEKs, TLS certificates and local systems' certificates."""
    soon = now + dt.timedelta(days=warn_days)
    party = cast(PartyId, own.current.party)
    lines: list[KeyLine] = []
    for history in (own, partner):
        current = history.current
        if history is own and current.version > 1:
            state = "acknowledged" if acknowledged.get(current.version) else "NOT YET ACKNOWLEDGED"
        else:
            state = "in force"
        expires = None if current.version == 1 else current.expires_at
        lines.append(
            KeyLine(
                current.party,
                "key set",
                f"version {current.version}",
                state,
                expires,
                bool(expires and expires <= soon),
            )
        )
        for k in current.keys:
            until = k.revoked_at or k.valid_until  # a revoked key: "until" is its revocation time
            expiring = k.state == "active" and k.valid_until is not None and k.valid_until <= soon
            lines.append(KeyLine(current.party, f"{k.purpose} key", k.kid, k.state, until, expiring))
    keks = KekStore(key_dir / "kek", "").kids()  # names only: no key is opened
    for kid in keks:
        live = [k for k in keks if k[:11] == kid[:11]][-1] == kid  # the newest of its period
        lines.append(KeyLine(party, "content KEK", kid, "live" if live else "retiring", None, False))
    lines += tls_certificates(tls_dir, agreement, party, soon)
    for client in clients:
        expires = dt.datetime.fromisoformat(client.not_after) if client.not_after else None
        state = "certificate" if expires else "certificate (expiry not recorded)"
        lines.append(
            KeyLine(
                party,
                "client certificate",
                client.client_id,
                state,
                expires,
                bool(expires and expires <= soon),
            )
        )
        if client.previous_until and dt.datetime.fromisoformat(client.previous_until) > now:
            lines.append(
                KeyLine(
                    party,
                    "client certificate",
                    client.client_id,
                    f"previous, accepted until {client.previous_until[:19]}",
                    None,
                    False,
                )
            )
    return lines


def certificate_health(
    tls_dir: Path, agreement: Agreement, party: PartyId, now: dt.datetime, warn_days: int
) -> list[dict[str, object]]:
    """The node's TLS certificates as ``/healthz`` reports them (``models.CertificateHealth``)."""
    return [
        {
            "name": line.kind.removeprefix("TLS "),
            "owner": line.owner,
            "subject": line.ident,
            "not_after": line.expires,
            "days_left": (line.expires - now).days if line.expires else None,
            "expiring": line.expiring,
        }
        for line in tls_certificates(tls_dir, agreement, party, now + dt.timedelta(days=warn_days))
    ]
