"""What keys and certificates a node holds, and which expire soon: for ``exchange keys list``.

Reads the key ring, the KEK file names, the TLS certificates and the partner's keys as the agreement
pins them. Never reads or prints private key material.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from exchange import crypto
from exchange.agreement import Agreement
from exchange.errors import ExchangeError
from exchange.keys.kek import KekStore
from exchange.keys.store import read_keyring
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


def key_inventory(
    *, key_dir: Path, tls_dir: Path, agreement: Agreement, party: PartyId, now: dt.datetime, warn_days: int
) -> list[KeyLine]:
    """Every key and certificate of this node and the partner's pinned keys, oldest expiry first within
    each group. Raises KeyManagementError if the key ring cannot be read."""
    soon = now + dt.timedelta(days=warn_days)
    lines = [
        KeyLine(party, f"message key ({k.use})", k.kid, k.status, None, False)
        for k in read_keyring(key_dir).keys
    ]
    keks = KekStore(key_dir / "kek", "").kids()  # names only: no key is opened
    for kid in keks:
        live = [k for k in keks if k[:11] == kid[:11]][-1] == kid  # the newest of its period
        lines.append(KeyLine(party, "content KEK", kid, "live" if live else "retiring", None, False))
    for name in CERTIFICATES:
        path = tls_dir / name
        if not path.exists():
            continue
        try:
            info = crypto.certificate_info(path.read_bytes())
        except ExchangeError:
            lines.append(KeyLine(party, f"TLS {name}", "(unreadable)", "invalid", None, True))
            continue
        owner = agreement.partner_of(party) if name == "partner-ca.pem" else party
        lines.append(
            KeyLine(
                owner, f"TLS {name}", info.common_name, "certificate", info.not_after, info.not_after <= soon
            )
        )
    partner = agreement.partner_of(party)
    pinned = agreement.parties[partner]
    for label, keys in (("signing", pinned.signing_keys), ("encryption", pinned.encryption_keys)):
        lines += [KeyLine(partner, f"message key ({label})", k.kid, "pinned", None, False) for k in keys]
    lines.append(KeyLine(partner, "checkpoint key", pinned.checkpoint_key.kid, "pinned", None, False))
    return lines
