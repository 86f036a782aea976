"""The administrator's command line: ``exchange --help``.

Every error is one line on stderr and a non-zero exit (2 for a refusal or bad input, 1 for an
integrity failure), never a stack trace.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import json
import logging
import os
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import click
import tomli_w
import typer
from joserfc.jwk import OKPKey
from pydantic import ValidationError

from exchange import crypto, envelope
from exchange.agreement import Agreement, PublicJWK, jwk_raw, load_agreement, parse_agreement
from exchange.auditing import DEFAULT_SKEW, AuditService, party_anchor, verifier_keys
from exchange.config import NODE_FILE, NodeSettings, check_passphrase, load_settings, resolve_passphrase
from exchange.db import repo
from exchange.db.agreement_book import AgreementBook
from exchange.db.engine import Database, current_revision, upgrade
from exchange.errors import (
    ConfigurationError,
    EnvelopeError,
    ExchangeError,
    InvalidInput,
    KeyManagementError,
    LedgerIntegrityError,
)
from exchange.files import private_dir, private_umask, restrict_tree, write_private
from exchange.keys.store import create_node_keys, public_party_keys
from exchange.ledger import EntryDraft
from exchange.ledger.audit import FlaggedSignature
from exchange.ledger.bundle import verify_bundle
from exchange.ledger.checkpoint import SIG_COSIGNATURE_V1, SIG_ED25519, NoteVerifier
from exchange.ledger.events import LedgerEvent
from exchange.observability import MONITORING_ROLE
from exchange.pki import (
    AGENCIES,
    TLSFiles,
    create_dev_pki,
    issue_client,
    node_name,
    renew_certificate,
    sign_client_request,
)
from exchange.types import PARTIES

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_enable=False)
agreement_app = typer.Typer(
    no_args_is_help=True, help="Compose and check the agreement; install a new version."
)
db_app = typer.Typer(no_args_is_help=True, help="Database migrations.")
clients_app = typer.Typer(no_args_is_help=True, help="Register local systems by their certificate.")
pki_app = typer.Typer(no_args_is_help=True, help="The development PKI.")
envelope_app = typer.Typer(no_args_is_help=True, help="Seal and open envelopes with JWK files.")
audit_app = typer.Typer(no_args_is_help=True, help="Verify the audit ledger.")
keys_app = typer.Typer(no_args_is_help=True, help="The node's keys and certificates.")
retention_app = typer.Typer(no_args_is_help=True, help="Destroy content whose retention has passed.")
requests_app = typer.Typer(no_args_is_help=True, help="Requests awaiting an answer.")
for sub, name in [
    (keys_app, "keys"),
    (retention_app, "retention"),
    (requests_app, "requests"),
    (agreement_app, "agreement"),
    (db_app, "db"),
    (clients_app, "clients"),
    (pki_app, "pki"),
    (envelope_app, "envelope"),
    (audit_app, "audit"),
]:
    app.add_typer(sub, name=name)

DirOpt = Annotated[Path, typer.Option("--dir", help="the node directory", file_okay=False)]
CertOpt = Annotated[
    Path | None, typer.Option(help="the client's certificate (PEM)", exists=True, dir_okay=False)
]
CsrOpt = Annotated[
    Path | None,
    typer.Option(help="the client's certificate signing request: the node's CA signs it", dir_okay=False),
]
OutOpt = Annotated[
    Path | None, typer.Option(help="with --csr: where to write the client's certificate", dir_okay=False)
]
PARTY_FILE = "party.toml"
CLIENT_PASSPHRASE_VAR = "EXCHANGE_CLIENT_KEY_PASSPHRASE"  # noqa: S105 (a variable name)

#: a client id or certificate name: also a file name, so no separators, no dot first, no controls
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_PATTERN = re.compile(rf"(?=.{{1,253}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")


@app.callback()
def _every_command() -> None:
    """Owner-only files whatever the umask; Alembic's progress lines stay out of the output."""
    private_umask()
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _check_name(option: str, value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise InvalidInput(
            f"{option} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit,"
            f" not {value!r}"
        )
    return value


def _check_host(option: str, value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not HOSTNAME_PATTERN.fullmatch(value):
            raise InvalidInput(f"{option} must be an IP address or a DNS name, not {value!r}") from None
    return value


def _check_endpoint(value: str) -> str:
    try:
        url = urlsplit(value)
        port = url.port
    except ValueError as exc:
        raise InvalidInput(f"--endpoint is not a URL: {exc}") from exc
    if url.scheme != "https" or not url.hostname:
        raise InvalidInput(f"--endpoint must be an https:// URL with a host, not {value!r}")
    if url.username or url.password or url.query or url.fragment or url.path not in ("", "/"):
        raise InvalidInput(f"--endpoint must be https://HOST[:PORT] only, not {value!r}")
    _check_host("--endpoint", url.hostname)
    if port == 0:
        raise InvalidInput("--endpoint has port 0")
    return value.rstrip("/")


def _passphrase_from_env() -> str:
    """The passphrase of a command that runs before any node.toml exists (init, issuing certificates)."""
    file = os.environ.get("EXCHANGE_KEY_PASSPHRASE_FILE")
    return resolve_passphrase(os.environ.get("EXCHANGE_KEY_PASSPHRASE"), Path(file) if file else None)


@app.command()
def init(
    party: Annotated[str, typer.Option(help="ID (Indonesia) or MY (Malaysia)")],
    directory: DirOpt,
    port: Annotated[int, typer.Option(help="port the node listens on", min=1, max=65535)] = 8443,
    host: Annotated[str, typer.Option(help="address the node listens on")] = "127.0.0.1",
    endpoint: Annotated[str | None, typer.Option(help="public https URL of this node")] = None,
    hostname: Annotated[list[str] | None, typer.Option(help="DNS name for the TLS certificates")] = None,
    dev_pki: Annotated[bool, typer.Option(help="create a development CA and certificates")] = True,
) -> None:
    """Create a node directory: settings, encrypted message keys, TLS material, party fragment."""
    if party not in PARTIES:
        raise InvalidInput(f"--party must be one of {', '.join(PARTIES)}, not {party!r}")
    _check_host("--host", host)
    for name in hostname or []:
        _check_host("--hostname", name)
    public_endpoint = _check_endpoint(endpoint) if endpoint else f"https://{host}:{port}"
    if directory.exists() and not directory.is_dir():
        raise InvalidInput(f"--dir {directory} is a file, not a folder")
    if (directory / NODE_FILE).exists():
        raise ConfigurationError(f"{directory} is already a node directory")
    passphrase = _passphrase_from_env()
    private_dir(directory)
    ring = create_node_keys(directory / "keys", party, passphrase)
    tls = TLSFiles(directory / "tls")
    if dev_pki:
        create_dev_pki(
            tls,
            party,
            passphrase,
            hostnames=("localhost", *(hostname or [])),
            ips=("127.0.0.1",),
        )
    write_private(
        directory / NODE_FILE, tomli_w.dumps({"party": party, "listen_host": host, "listen_port": port})
    )
    fragment = {
        "id": party,
        "name": AGENCIES[party],
        "endpoint": public_endpoint,
        "node_name": node_name(party),
        "node_key_sha256": crypto.public_key_sha256(tls.node_cert.read_bytes())
        if tls.node_cert.exists()
        else "",
        "ca_certificate": tls.ca_cert.read_text() if tls.ca_cert.exists() else "",
        **public_party_keys(ring),
    }
    checkpoint_key = PublicJWK.model_validate(fragment["checkpoint_key"])
    fragment["ledger_key"] = NoteVerifier(
        f"{node_name(party)}/ledger", SIG_ED25519, jwk_raw(checkpoint_key)
    ).vkey
    fragment["witness_key"] = NoteVerifier(
        f"{node_name(party)}/witness", SIG_COSIGNATURE_V1, jwk_raw(checkpoint_key)
    ).vkey
    write_private(directory / PARTY_FILE, tomli_w.dumps(fragment))
    restrict_tree(directory)
    typer.echo(f"initialised node {party} in {directory}; share {directory / PARTY_FILE} with the partner")


@agreement_app.command("compose")
def agreement_compose(
    party_file: Annotated[
        list[Path], typer.Option("--party", help="a party.toml from `exchange init` (twice)")
    ],
    out: Annotated[Path, typer.Option(help="where to write the agreement")],
    version: Annotated[str | None, typer.Option(help="agreement version")] = None,
) -> None:
    """Compose an agreement from the two party fragments and the default terms."""
    from importlib.resources import files

    data: dict[str, Any] = tomllib.loads(files("exchange").joinpath("agreement_defaults.toml").read_text())
    parties: dict[str, Any] = {}
    for path in party_file:
        try:
            fragment = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"--party {path} is not a TOML party file: {exc}") from exc
        if not isinstance(fragment.get("id"), str):
            raise InvalidInput(f"--party {path} has no party id: use a party.toml from `exchange init`")
        parties[str(fragment.pop("id"))] = fragment
    for pid, fragment in parties.items():  # each party classifies in the scheme the terms give it
        scheme = data.get("party_schemes", {}).get(pid)
        if scheme is not None:
            fragment["scheme"] = scheme
    data["parties"] = parties
    if version:
        data["version"] = version
    agreement = parse_agreement(data, source="composed agreement")
    _write_new_file("--out", out, tomli_w.dumps(data, multiline_strings=True))
    typer.echo(f"agreement {agreement.version} written to {out} (sha256 {agreement.digest})")


@agreement_app.command("check")
def agreement_check(path: Annotated[Path, typer.Argument(help="agreement TOML file")]) -> None:
    """Validate an agreement file and print its version and digest."""
    agreement = load_agreement(path)
    typer.echo(f"agreement {agreement.version} is valid (sha256 {agreement.digest})")


def _agreements(settings: NodeSettings, db: Database) -> AgreementBook:
    """The node's agreement versions: its agreement file, then each one installed (read at once)."""
    return AgreementBook(db, load_agreement(settings.agreement_file), ttl=0)


@agreement_app.command("install")
def agreement_install(
    directory: DirOpt,
    path: Annotated[Path, typer.Argument(help="the new version's agreement TOML file")],
    late: Annotated[
        bool,
        typer.Option(
            "--late", help="install a version whose effective_from has passed (catching up with the partner)"
        ),
    ] = False,
) -> None:
    """Install a new version of the agreement on this node, ledgered. Every process of the node holds
    it within seconds, without a restart, and sends under it from its ``effective_from``: install
    the same file on the partner's node before then. It must follow the newest version held: the
    same parties, classification schemes, TLP, envelope limit, witnesses and child age; purposes,
    types, roles, handling codes, third parties and units only added to."""
    settings = load_settings(directory)
    agreement = load_agreement(path)
    now = dt.datetime.now(dt.UTC)
    with _node_database(directory) as db:
        installed = _agreements(settings, db).install(agreement, now, late=late)
    if not installed:
        typer.echo(f"agreement {agreement.version} is installed already (sha256 {agreement.digest})")
        return
    assert agreement.effective_from is not None
    typer.echo(
        f"installed agreement {agreement.version} (sha256 {agreement.digest}), in force from"
        f" {agreement.effective_from.isoformat()}"
    )
    if agreement.effective_from <= now:
        typer.echo(
            "warning: it is in force already: the partner rejects what this node sends under it until"
            " it installs it too",
            err=True,
        )


@agreement_app.command("list")
def agreement_list(directory: DirOpt) -> None:
    """Print every agreement version the node holds, oldest first, and which one is in force:
    version, digest, effective from (tab-separated)."""
    settings = load_settings(directory)
    with _node_database(directory) as db:
        history = _agreements(settings, db).history()
    current = history.in_force(dt.datetime.now(dt.UTC))
    for terms in history.versions:
        start = terms.agreement.effective_from
        since = start.isoformat() if start else "(from the start)"
        marker = "\tin force" if terms is current else ""
        typer.echo(f"{terms.version}\t{terms.agreement.digest}\t{since}{marker}")


@db_app.command("upgrade")
def db_upgrade(directory: DirOpt) -> None:
    """Apply the database migrations."""
    settings = load_settings(directory)
    before = current_revision(settings.database_url)
    after = upgrade(settings.database_url)
    if before == after:
        typer.echo(f"database already at the latest revision ({after})")
    else:
        typer.echo(f"database upgraded from {before or '(empty)'} to {after}")


def _node_database(directory: Path) -> Database:
    """The node's database, checked to be migrated; use it as a context manager."""
    db = Database(load_settings(directory).database_url)
    try:
        db.check_migrated()
    except ExchangeError:
        db.dispose()
        raise
    return db


def _check_text(option: str, value: str) -> str:
    if not value.strip() or not value.isprintable() or len(value) > 128:
        raise InvalidInput(f"{option} must be 1-128 printable characters, not {value!r}")
    return value


def _check_client_certificate(path: Path, pem: bytes, tls: TLSFiles, own_ca: bytes) -> crypto.CertificateInfo:
    """The certificate's details if it may identify a local system: issued by this node's CA, for
    client authentication only, and none of the node's own certificates."""
    try:
        info = crypto.certificate_info(pem)
    except KeyManagementError as exc:
        raise InvalidInput(f"--cert {path} is not a certificate: {exc}") from exc
    if not crypto.is_issued_by(pem, own_ca):
        raise InvalidInput(f"--cert {path} is not issued by this node's certificate authority")
    own = {
        crypto.certificate_info(p.read_bytes()).fingerprint
        for p in (tls.ca_cert, tls.server_cert, tls.node_cert)
        if p.is_file()
    }
    if info.fingerprint in own:
        raise InvalidInput(f"--cert {path} is one of this node's own certificates, not a local system's")
    if info.is_ca or crypto.NODE_PURPOSE_OID in info.purposes or crypto.SERVER_AUTH_OID in info.purposes:
        raise InvalidInput(f"--cert {path} is a CA, node or server certificate, not a local system's")
    if crypto.CLIENT_AUTH_OID not in info.purposes:
        raise InvalidInput(f"--cert {path} is not for client authentication (extended key usage)")
    return info


def _check_certificate_source(cert: Path | None, csr: Path | None, out: Path | None) -> None:
    if (cert is None) == (csr is None):
        raise InvalidInput("give exactly one of --cert FILE or --csr FILE")
    if csr is not None and out is None:
        raise InvalidInput("--csr needs --out: where to write the client's certificate")


def _client_certificate(
    cert: Path | None, csr: Path | None, settings: NodeSettings, agreement: Agreement, client_id: str
) -> tuple[bytes, crypto.CertificateInfo]:
    """A local system's certificate, given (``--cert``) or signed by the node's CA from its CSR
    (``--csr``, whose common name must be ``client_id``), checked by :func:`_check_client_certificate`.
    Nothing is written. Raises InvalidInput or ConfigurationError (no development CA key)."""
    tls = TLSFiles(settings.tls_dir)
    if csr is not None:
        request = _read_option_file("--csr", csr)
        pem = sign_client_request(tls, _passphrase_from_env(), request, settings.party, client_id)
        source = Path("(signed from --csr)")
    else:
        assert cert is not None
        pem, source = _read_option_file("--cert", cert), cert
    own_ca = agreement.parties[settings.party].ca_certificate.encode()
    return pem, _check_client_certificate(source, pem, tls, own_ca)


def _check_new_file(option: str, path: Path | None) -> None:
    """Raises InvalidInput if ``path`` (an output option's) exists: an output never replaces a file."""
    if path is not None and (path.exists() or path.is_symlink()):
        raise InvalidInput(f"{option} {path} exists: not overwriting it (remove it or choose another path)")


def _write_new_file(option: str, path: Path | None, data: bytes | str) -> None:
    """Write an output option's file, never over an existing one (see :func:`_check_new_file`)."""
    if path is None:
        return
    try:
        write_private(path, data, exclusive=True)
    except FileExistsError as exc:
        raise InvalidInput(f"{option} {path} exists: not overwriting it") from exc


def _read_option_file(option: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{option} {path}: {exc.strerror}") from exc


@clients_app.command("add")
def clients_add(
    directory: DirOpt,
    client_id: Annotated[str, typer.Option("--id", help="a short stable name")],
    agency: Annotated[str, typer.Option()],
    unit: Annotated[str, typer.Option()],
    clearance: Annotated[str, typer.Option(help="a level of this node's national scheme")],
    message_type: Annotated[
        list[str], typer.Option("--type", help="an entitled message type (repeatable), or ALL")
    ],
    purpose: Annotated[list[str], typer.Option(help="an entitled purpose (repeatable), or ALL")],
    cert: CertOpt = None,
    csr: CsrOpt = None,
    out: OutOpt = None,
    role: Annotated[list[str] | None, typer.Option(help="a role of the agreement (repeatable)")] = None,
    case: Annotated[
        list[str] | None, typer.Option("--case", help="restrict to this case reference (repeatable)")
    ] = None,
) -> None:
    """Register a local system by its certificate (issued by this node's CA), or sign its CSR with
    the node's CA and register the certificate (the client's private key never leaves it). It may do
    only what it is registered for: its message types and purposes (``ALL`` must be said), its cases
    (every case unless restricted) and its unit's addressed messages."""
    _check_name("--id", client_id)
    _check_text("--agency", agency)
    _check_certificate_source(cert, csr, out)
    if MONITORING_ROLE in (role or []):
        raise InvalidInput(f"--role {MONITORING_ROLE} is reserved: use `exchange clients add-monitoring`")
    settings = load_settings(directory)
    with _node_database(directory) as db:  # what a client may do: the newest version's vocabulary
        agreement = _agreements(settings, db).history().newest.agreement
    levels = list(agreement.schemes[agreement.parties[settings.party].scheme].levels)
    if clearance not in levels:
        raise InvalidInput(f"--clearance must be one of {levels}, not {clearance!r}")
    units = agreement.organisations[settings.party].units
    if unit not in units:
        raise InvalidInput(f"--unit must be one of {sorted(units)}, not {unit!r}")
    for option, given, known in (
        ("--type", message_type, agreement.message_types),
        ("--purpose", purpose, agreement.purposes),
        ("--role", role or [], agreement.roles),
    ):
        unknown = [v for v in given if v not in known and not (v == "ALL" and option != "--role")]
        if unknown:
            raise InvalidInput(
                f"{option}: {unknown} not among {sorted(known)}" + (" or ALL" if option != "--role" else "")
            )
    pem, info = _client_certificate(cert, csr, settings, agreement, client_id)
    _check_new_file("--out", out)
    with _node_database(directory) as db, db.transaction() as conn:
        repo.insert_client(
            conn,
            {
                "id": client_id,
                "cert_fingerprint": info.fingerprint,
                "agency": agency,
                "unit": unit,
                "roles": role or [],
                "clearance": clearance,
                "message_types": message_type,
                "purposes": purpose,
                "cases": case or ["ALL"],
                "created_at": dt.datetime.now(dt.UTC).isoformat(),
                "cert_not_after": info.not_after.isoformat(),
            },
        )
    _write_new_file("--out", out, pem)
    typer.echo(f"registered {client_id} (certificate {info.fingerprint[:16]}…, clearance {clearance})")


@clients_app.command("add-monitoring")
def clients_add_monitoring(
    directory: DirOpt,
    client_id: Annotated[str, typer.Option("--id", help="a short stable name, e.g. prometheus")],
    cert: CertOpt = None,
    csr: CsrOpt = None,
    out: OutOpt = None,
) -> None:
    """Register a monitoring system (Prometheus) by its certificate or CSR, as ``clients add`` does:
    it may read ``/metrics`` and nothing else (no message, type, purpose, case or audit entry)."""
    _check_name("--id", client_id)
    _check_certificate_source(cert, csr, out)
    settings = load_settings(directory)
    agreement = load_agreement(settings.agreement_file)
    pem, info = _client_certificate(cert, csr, settings, agreement, client_id)
    _check_new_file("--out", out)
    lowest = next(iter(agreement.schemes[agreement.parties[settings.party].scheme].levels))
    with _node_database(directory) as db, db.transaction() as conn:
        repo.insert_client(
            conn,
            {
                "id": client_id,
                "cert_fingerprint": info.fingerprint,
                "agency": "-",
                "unit": "-",
                "roles": [MONITORING_ROLE],
                "clearance": lowest,
                "message_types": [],
                "purposes": [],
                "cases": [],
                "created_at": dt.datetime.now(dt.UTC).isoformat(),
            },
        )
    _write_new_file("--out", out, pem)
    typer.echo(
        f"registered {client_id} (certificate {info.fingerprint[:16]}…) to read /metrics and /healthz only"
    )


@clients_app.command("list")
def clients_list(directory: DirOpt) -> None:
    """List registered local systems."""
    with _node_database(directory) as db, db.read() as conn:
        rows = repo.list_clients(conn)
    for row in rows:
        typer.echo(
            f"{row['id']}\t{row['agency']}/{row['unit']}\tclearance={row['clearance']}\t"
            f"roles={','.join(row['roles']) or '-'}\tcert={row['cert_fingerprint'][:16]}…"
            f"\tuntil={(row['cert_not_after'] or '-')[:10]}"
        )
    if not rows:
        typer.echo("no clients registered")


@clients_app.command("remove")
def clients_remove(directory: DirOpt, client_id: Annotated[str, typer.Option("--id")]) -> None:
    """Remove a local system; its certificate is refused from then on."""
    _check_name("--id", client_id)
    with _node_database(directory) as db, db.transaction() as conn:
        repo.delete_client(conn, client_id)
    typer.echo(f"removed {client_id}")


def _append_ledger(conn: Any, head: repo.LedgerHead, draft: EntryDraft, now: dt.datetime) -> None:
    """Append one entry after ``head``, locked by the first statement of the caller's transaction."""
    repo.append_ledger(conn, head, [draft], now.astimezone(dt.UTC).isoformat(timespec="microseconds"))


@clients_app.command("renew")
def clients_renew(
    directory: DirOpt,
    client_id: Annotated[str, typer.Option("--id", help="the registered client")],
    csr: Annotated[
        Path | None,
        typer.Option(
            help="the client's new certificate signing request: the node's CA signs it", dir_okay=False
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="with --csr: where to write the new certificate", dir_okay=False)
    ] = None,
    cert: Annotated[
        Path | None, typer.Option(help="a new certificate issued by this node's CA (PEM)", dir_okay=False)
    ] = None,
    overlap_hours: Annotated[
        float | None,
        typer.Option(
            help="how long the previous certificate stays accepted (default client_certificate_overlap_hours;"
            " 0 cuts it off at once, as for a compromised key)",
            min=0,
        ),
    ] = None,
) -> None:
    """Give a registered local system a new certificate (from its CSR, or issued by this node's CA),
    keeping its registration. Its previous certificate stays accepted for the overlap (never past that
    certificate's own expiry), then gets 403 like any unregistered certificate; ledgered."""
    _check_name("--id", client_id)
    _check_certificate_source(cert, csr, out)
    settings = load_settings(directory)
    now = dt.datetime.now(dt.UTC)
    with _node_database(directory) as db:
        with db.read() as conn:
            if repo.get_client(conn, client_id) is None:
                raise InvalidInput(f"--id: no registered client {client_id!r} (see `exchange clients list`)")
        pem, info = _client_certificate(
            cert, csr, settings, load_agreement(settings.agreement_file), client_id
        )
        if info.not_after <= now:
            raise InvalidInput(f"the new certificate expired at {info.not_after.isoformat()}")
        hours = settings.client_certificate_overlap_hours if overlap_hours is None else overlap_hours
        until = now + dt.timedelta(hours=hours)
        with db.transaction() as conn:
            head = repo.lock_ledger_head(conn)
            before = repo.get_client(conn, client_id)
            if before is not None and before["cert_not_after"]:
                until = min(until, dt.datetime.fromisoformat(before["cert_not_after"]))
            before = repo.renew_client_certificate(
                conn, client_id, info.fingerprint, info.not_after.isoformat(), until.isoformat()
            )
            _append_ledger(
                conn,
                head,
                EntryDraft(
                    event=LedgerEvent.CLIENT_CERTIFICATE_RENEWED,
                    actor=settings.party,
                    data={
                        "client": client_id,
                        "fingerprint": info.fingerprint,
                        "not_after": info.not_after.isoformat(),
                        "previous_fingerprint": before["cert_fingerprint"],
                        "previous_accepted_until": until.isoformat(),
                    },
                ),
                now,
            )
            if csr is not None and out is not None:
                write_private(out, pem)
    cut = "cut off now" if until <= now else f"accepted until {until.isoformat(timespec='seconds')}"
    typer.echo(
        f"renewed {client_id}: certificate {info.fingerprint[:16]}… until {info.not_after.date()};"
        f" the previous one {before['cert_fingerprint'][:16]}… {cut}"
    )


@pki_app.command("renew")
def pki_renew(
    directory: DirOpt,
    server: Annotated[bool, typer.Option("--server", help="the server certificate (tls/server.pem)")] = False,
    node: Annotated[
        bool, typer.Option("--node", help="the node-to-node certificate (tls/node.pem): same key, same pin")
    ] = False,
    days: Annotated[
        int | None, typer.Option(help="validity of the certificate the node's CA issues", min=1, max=3650)
    ] = None,
    cert: Annotated[
        Path | None,
        typer.Option(
            help="install this certificate (issued by your CA for the same key) instead", dir_okay=False
        ),
    ] = None,
) -> None:
    """Replace the server or the node-to-node certificate for the key the node already holds: the
    node's development CA re-certifies it, or ``--cert`` installs one your CA issued. The key and so
    the pin are unchanged (a new node key is announced through key sets). The running node serves it
    on new connections within ``tls_reload_seconds``, without a restart; ledgered."""
    if server == node:
        raise InvalidInput("give exactly one of --server or --node")
    if cert is not None and days is not None:
        raise InvalidInput("--days applies to a certificate the node issues, not to --cert")
    which: Literal["server", "node"] = "server" if server else "node"
    settings = load_settings(directory)
    passphrase = _passphrase_from_env()
    now = dt.datetime.now(dt.UTC)
    pem = _read_option_file("--cert", cert) if cert is not None else None
    with _node_database(directory) as db, db.transaction() as conn:
        head = repo.lock_ledger_head(conn)
        renewal = renew_certificate(
            TLSFiles(settings.tls_dir), which, passphrase, days=days, cert_pem=pem, now=now
        )
        _append_ledger(
            conn,
            head,
            EntryDraft(
                event=LedgerEvent.TLS_CERTIFICATE_RENEWED,
                actor=settings.party,
                data={
                    "certificate": which,
                    "fingerprint": renewal.current.fingerprint,
                    "not_after": renewal.current.not_after.isoformat(),
                    "previous_fingerprint": renewal.previous.fingerprint,
                    "key_sha256": renewal.current.public_key_sha256,
                },
            ),
            now,
        )
    typer.echo(
        f"renewed the {which} certificate: {renewal.current.fingerprint[:16]}… until"
        f" {renewal.current.not_after.date()} (key {renewal.current.public_key_sha256[:16]}… unchanged);"
        f" the node serves it within {settings.tls_reload_seconds:g} s"
    )


@pki_app.command("issue-client")
def pki_issue_client(
    directory: DirOpt,
    name: Annotated[str, typer.Option(help="the client's common name")],
    out: Annotated[Path, typer.Option(help="folder for the certificate and key", file_okay=False)],
) -> None:
    """Issue a local-system certificate and key from the node's development CA. The key is encrypted
    with the client's own passphrase (EXCHANGE_CLIENT_KEY_PASSPHRASE), never the node's; a real
    national system makes its own key and sends a CSR (`exchange clients add --csr`)."""
    _check_name("--name", name)
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {out} is a file, not a folder")
    settings = load_settings(directory)
    node_passphrase = _passphrase_from_env()
    client_passphrase = os.environ.get(CLIENT_PASSPHRASE_VAR)
    if client_passphrase is None:
        raise ConfigurationError(
            f"set {CLIENT_PASSPHRASE_VAR}: the client's key gets a passphrase of its own"
        )
    check_passphrase(client_passphrase, f"the client key passphrase ({CLIENT_PASSPHRASE_VAR})")
    if client_passphrase == node_passphrase:
        raise ConfigurationError(f"{CLIENT_PASSPHRASE_VAR} must differ from the node's key passphrase")
    cert, key = issue_client(
        TLSFiles(settings.tls_dir), node_passphrase, client_passphrase, name, out, settings.party
    )
    typer.echo(f"issued {cert} and {key}")


@pki_app.command("pin")
def pki_pin(
    cert: Annotated[Path, typer.Option(help="a certificate (PEM), e.g. tls/node.pem", dir_okay=False)],
) -> None:
    """Print the pin of a certificate (hex SHA-256 of its public key), as the agreement's
    ``node_key_sha256`` names a node-to-node certificate."""
    try:
        typer.echo(crypto.public_key_sha256(cert.read_bytes()))
    except KeyManagementError as exc:
        raise InvalidInput(f"--cert {cert} is not a certificate: {exc}") from exc


@keys_app.command("list")
def keys_list(directory: DirOpt) -> None:
    """Every key and certificate of this node (local systems' certificates included) and of the
    partner, with states and dates; what expires within ``expiry_warning_days`` is flagged. No
    private key is read."""
    from exchange.keys.inventory import ClientCertificate, key_inventory

    settings = load_settings(directory)
    try:
        with _node_database(directory) as db, db.read() as conn:
            clients = [
                ClientCertificate(row["id"], row["cert_not_after"], row["previous_until"])
                for row in repo.list_clients(conn)
            ]
    except ExchangeError as exc:  # the keys and TLS files are still worth listing
        clients = []
        typer.echo(f"warning: local systems' certificates not listed: {exc}", err=True)
    registry = _registry(settings)
    try:
        lines = key_inventory(
            key_dir=settings.key_dir,
            tls_dir=settings.tls_dir,
            agreement=registry.agreement,
            own=registry.history(registry.party),
            partner=registry.history(registry.partner),
            acknowledged={r["version"]: r["acknowledged_at"] for r in registry.own_rows()},
            now=dt.datetime.now(dt.UTC),
            warn_days=settings.expiry_warning_days,
            clients=clients,
        )
    finally:
        registry.db.dispose()
    for line in lines:
        typer.echo(line.render())
    expiring = [line for line in lines if line.expiring]
    if expiring:
        typer.echo(f"warning: {len(expiring)} expire within {settings.expiry_warning_days} days", err=True)


def _registry(settings: Any) -> Any:
    """Both parties' key histories from the node's database (dispose ``.db`` when done)."""
    from exchange.keys.registry import KeyRegistry

    agreement = load_agreement(settings.agreement_file)
    db = Database(settings.database_url)
    try:
        db.check_migrated()
    except ExchangeError:
        db.dispose()
        raise
    return KeyRegistry(db, agreement, settings.party, agreement.partner_of(settings.party))


class KeyPurpose(enum.StrEnum):
    signing = "signing"
    encryption = "encryption"
    checkpoint = "checkpoint"
    tls = "tls"  # the node-to-node certificate's key, announced by its pin


PurposeOpt = Annotated[
    KeyPurpose,
    typer.Option("--purpose", help="which key: signing, encryption, checkpoint or tls (node-to-node)"),
]


def _key_admin(directory: Path) -> Any:
    from exchange.keys.rotation import KeyAdmin

    settings = load_settings(directory)
    return KeyAdmin(settings, _registry(settings))


def _await_acknowledgement(admin: Any, wait: float) -> None:
    """Wait up to ``wait`` seconds for the running node to announce our newest version and the
    partner to acknowledge it; say which happened."""
    import time

    version = admin.own.version
    deadline = time.monotonic() + wait
    while True:
        rows = {r["version"]: r for r in admin.registry.own_rows()}
        ack = rows.get(version, {}).get("acknowledged_at")
        if ack:
            typer.echo(f"version {version} acknowledged by {admin.registry.partner} at {ack}")
            return
        if time.monotonic() >= deadline:
            typer.echo(
                f"version {version} not acknowledged yet: the node announces it to {admin.registry.partner}"
                " before it delivers anything; see `exchange keys list`"
            )
            return
        time.sleep(0.2)


@keys_app.command("rotate")
def keys_rotate(
    directory: DirOpt,
    purpose: PurposeOpt,
    wait: Annotated[
        float, typer.Option(help="seconds to wait for the partner's acknowledgement", min=0)
    ] = 10.0,
) -> None:
    """Make a next key for PURPOSE and announce the new key set to the partner (the running node
    delivers the announcement; the partner verifies, stores and acknowledges it with a signed
    receipt). Activate it with `exchange keys activate` once acknowledged."""
    admin = _key_admin(directory)
    try:
        if purpose is KeyPurpose.tls:
            pin = admin.rotate_tls()
            typer.echo(
                f"next node-to-node key {pin[:16]}… staged, its pin in key set version {admin.own.version}"
            )
        else:
            entry = admin.rotate(purpose.value)
            typer.echo(f"next {purpose.value} key {entry.kid} in key set version {admin.own.version}")
        _await_acknowledgement(admin, wait)
    finally:
        admin.registry.db.dispose()


@keys_app.command("activate")
def keys_activate(
    directory: DirOpt,
    purpose: PurposeOpt,
    force: Annotated[
        bool,
        typer.Option(
            help="activate without the partner's acknowledgement, after key_activation_wait_seconds"
        ),
    ] = False,
    wait: Annotated[
        float, typer.Option(help="seconds to wait for the partner's acknowledgement", min=0)
    ] = 10.0,
) -> None:
    """Switch PURPOSE to its next key, refused until the partner acknowledged it (or --force after the
    configured wait, ledgered as forced). The old key stays trusted while anything it signed may be
    in flight; an old encryption key is destroyed once the partner uses the new one, after a grace."""
    admin = _key_admin(directory)
    try:
        if purpose is KeyPurpose.tls:
            pin = admin.activate_tls(force=force)
            typer.echo(f"node-to-node key {pin[:16]}… in use, key set version {admin.own.version}")
        else:
            entry = admin.activate(purpose.value, force=force)
            typer.echo(f"{purpose.value} key {entry.kid} active in key set version {admin.own.version}")
        _await_acknowledgement(admin, wait)
    finally:
        admin.registry.db.dispose()


@keys_app.command("revoke")
def keys_revoke(
    directory: DirOpt,
    kid: Annotated[str, typer.Argument(help="the key id to revoke (see `exchange keys list`)")],
    reason: Annotated[str, typer.Option(help="why: recorded in the ledger and the key set")],
    effective_at: Annotated[
        str | None, typer.Option(help="ISO 8601 time from which nothing it signed is trusted (default now)")
    ] = None,
    wait: Annotated[
        float, typer.Option(help="seconds to wait for the partner's acknowledgement", min=0)
    ] = 10.0,
) -> None:
    """Revoke one of this node's keys from --effective-at and announce it at once; an active key is
    replaced by a new one in the same step (an emergency rotation). The partner refuses anything
    signed by it after that time, and `exchange audit verify` flags it."""
    when = dt.datetime.now(dt.UTC)
    if effective_at is not None:
        try:
            when = dt.datetime.fromisoformat(effective_at)
        except ValueError:
            raise InvalidInput(f"--effective-at is not an ISO 8601 time: {effective_at!r}") from None
        if when.tzinfo is None:
            raise InvalidInput("--effective-at needs a time zone (e.g. 2026-11-23T10:00:00+00:00)")
    admin = _key_admin(directory)
    try:
        replacement = admin.revoke(kid, reason=reason, effective_at=when)
        typer.echo(f"{kid} revoked from {when.isoformat()} in key set version {admin.own.version}")
        if replacement is not None:
            typer.echo(f"replaced at once by {replacement.purpose} key {replacement.kid}")
        _await_acknowledgement(admin, wait)
    finally:
        admin.registry.db.dispose()


@retention_app.command("run")
def retention_run(directory: DirOpt) -> None:
    """Destroy the content of every message past its destroy date (idempotent); the ledger keeps
    that each existed, its digests, and when and why it was destroyed."""
    from exchange.node import Node

    node = Node(load_settings(directory))
    try:
        destroyed = node.retention.run(dt.datetime.now(dt.UTC))
    finally:
        node.close()
    typer.echo(f"destroyed the content of {destroyed} message(s) past their retention")


@requests_app.command("overdue")
def requests_overdue(directory: DirOpt) -> None:
    """List requests whose response is overdue, with their age (and ledger newly overdue ones)."""
    from exchange.node import Node

    node = Node(load_settings(directory))
    now = dt.datetime.now(dt.UTC)
    try:
        node.deadlines.run(now)
        overdue = [r.view(now) for r in node.deadlines.open_requests(now, overdue_only=True)]
    finally:
        node.close()
    for r in overdue:
        typer.echo(
            f"{r['id']}\t{r['type']}\t{r['direction']}\tcase {r['case_ref']}\tdue {r['response_due']}"
            f"\toverdue {r['overdue_seconds'] // 3600} h"
        )
    if not overdue:
        typer.echo("no overdue requests")


@app.command()
def serve(
    directory: DirOpt,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="API processes sharing the port; more than 1 needs PostgreSQL. Each background loop"
            " is led by one process at a time (docs/operator.md).",
        ),
    ] = 1,
) -> None:
    """Run the node (mutual TLS, delivery worker) until interrupted; it logs JSON lines unless
    ``log_format = "text"``."""
    from exchange.api.server import serve as run
    from exchange.node import Node
    from exchange.observability import logs, metrics

    settings = load_settings(directory)
    logs.configure(settings.log_format, settings.log_level)
    metrics.reset_multiprocess_dir()  # before any process of this node counts (workers included)
    run(Node(settings), workers)


def _read_jwk(path: Path, option: str) -> Any:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InvalidInput(f"{option} {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise InvalidInput(f"{option} {path} is not JSON: {exc}") from exc
    try:
        key = OKPKey.import_key(data)
    except Exception as exc:  # joserfc raises several unrelated types for a malformed key
        raise InvalidInput(f"{option} {path} is not an OKP JWK: {type(exc).__name__}: {exc}") from exc
    if not key.kid:
        raise InvalidInput(f"{option} {path} has no kid")
    return key


@envelope_app.command("seal")
def envelope_seal(
    message: Annotated[Path, typer.Option(help="the message JSON (with the envelope fields)")],
    signing_key: Annotated[Path, typer.Option(help="sender's private Ed25519 JWK")],
    recipient_key: Annotated[Path, typer.Option(help="recipient's public X25519 JWK")],
) -> None:
    """Sign and encrypt a message; prints the compact JWE."""
    try:
        body = json.loads(message.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{message} is not a JSON file: {exc}") from exc
    try:
        typer.echo(
            envelope.seal(
                body,
                signing_key=_read_jwk(signing_key, "--signing-key"),
                recipient_key=_read_jwk(recipient_key, "--recipient-key"),
            )
        )
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc


@envelope_app.command("open")
def envelope_open(
    envelope_file: Annotated[Path, typer.Option("--envelope", help="the compact JWE")],
    decryption_key: Annotated[Path, typer.Option(help="recipient's private X25519 JWK")],
    verification_key: Annotated[Path, typer.Option(help="sender's public Ed25519 JWK")],
) -> None:
    """Decrypt and verify an envelope; prints the verified header and message as JSON."""
    dk, vk = _read_jwk(decryption_key, "--decryption-key"), _read_jwk(verification_key, "--verification-key")
    try:
        opened = envelope.open_stored(
            envelope_file.read_text().strip(), decryption_keys={dk.kid: dk}, verification_keys={vk.kid: vk}
        )
    except EnvelopeError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidInput(f"--envelope {envelope_file} cannot be opened: {type(exc).__name__}") from exc
    typer.echo(
        json.dumps(
            {"header": opened.header, "message": opened.message, "signer_kid": opened.signer_kid},
            indent=2,
            ensure_ascii=False,
        )
    )


def _audit_service(directory: Path) -> AuditService:
    settings = load_settings(directory)
    return AuditService(
        _node_database(directory),
        load_agreement(settings.agreement_file),
        settings.party,
        settings.clock_skew,
    )


@audit_app.command("verify")
def audit_verify(
    directory: Annotated[
        Path | None, typer.Option("--dir", help="the node directory", file_okay=False)
    ] = None,
    bundle: Annotated[Path | None, typer.Option(help="an export bundle, verified offline")] = None,
    agreement_file: Annotated[
        Path | None, typer.Option("--agreement", help="the agreement (with --bundle)")
    ] = None,
    allow_uncosigned: Annotated[
        bool,
        typer.Option(
            "--allow-uncosigned", help="accept a bundle the partner node did not cosign (weaker: says so)"
        ),
    ] = False,
    require_witness: Annotated[
        list[str] | None,
        typer.Option(
            "--require-witness", help="a further witness whose cosignature must be there (repeatable)"
        ),
    ] = None,
) -> None:
    """Verify a node's whole ledger (the Merkle tree from every stored leaf, both parties' key-set
    histories from the agreement, every checkpoint, cosignature, further witness cosignature and
    witnessed checkpoint, each by the keys in force when it was made), or an export bundle offline
    from the agreement (a bundle the partner did not cosign fails unless --allow-uncosigned). Exits 1
    naming the first bad entry, checkpoint or key-set version, or listing every entry signed by a
    key not in force when it signed (a revoked key after its revocation time)."""
    if bundle is not None:
        if agreement_file is None:
            raise InvalidInput(
                "--bundle needs --agreement: the keys are checked against the agreement, not the bundle"
            )
        agreement = load_agreement(agreement_file)
        try:
            data = json.loads(bundle.read_text())
            own = party_anchor(agreement, data["party"])
            partner = party_anchor(agreement, agreement.partner_of(data["party"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"{bundle} is not an audit bundle: {exc}") from exc
        named = data.get("agreement")
        if not isinstance(named, dict) or named.get("digest") != agreement.digest:
            raise InvalidInput(f"{bundle} was exported under another agreement than {agreement_file}")
        checked = verify_bundle(
            data,
            own=own,
            partner=partner,
            witnesses=[w.verifier for w in agreement.witnesses],
            allow_uncosigned=allow_uncosigned,
            require=_known_witnesses(agreement, require_witness or []),
            skew=DEFAULT_SKEW,
        )
        typer.echo(checked.summary())
        _exit_if_flagged(checked.flagged)
        return
    if directory is None:
        raise InvalidInput("give --dir (a node) or --bundle with --agreement")
    service = _audit_service(directory)
    with service.db:
        report = service.verify()
    typer.echo(f"ledger verified: {report.summary()}")
    _exit_if_flagged(report.flagged)


def _exit_if_flagged(flagged: Sequence[FlaggedSignature]) -> None:
    """List every flagged signature and exit 1, if there is one."""
    if flagged:
        typer.echo("FLAGGED: signed by a key not in force when it signed:")
        for item in flagged:
            typer.echo(f"  {item.line()}")
        raise typer.Exit(1)


def _known_witnesses(agreement: Agreement, names: list[str]) -> list[str]:
    known = {w.name for w in agreement.witnesses}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidInput(f"--require-witness: {', '.join(unknown)} is not a witness the agreement names")
    return names


@audit_app.command("keys")
def audit_keys_command(
    directory: Annotated[
        Path | None, typer.Option("--dir", help="the node directory", file_okay=False)
    ] = None,
    agreement_file: Annotated[Path | None, typer.Option("--agreement", help="the agreement file")] = None,
) -> None:
    """Print the note verifier keys (name+keyid+base64): who signs which checkpoints and
    cosignatures, with every checkpoint key of both parties' key histories (--dir; --agreement: the
    keys the agreement pins). One key per line, tab-separated: holder, what it signs, key, key id,
    state, valid from, valid until, revoked at (- when none)."""
    if (directory is None) == (agreement_file is None):
        raise InvalidInput("give exactly one of --dir (a node) or --agreement FILE")
    if directory is not None:
        service = _audit_service(directory)
        with service.db:
            keys = service.keys()
        rows = verifier_keys(service.agreement, (keys.own, keys.partner))
    else:
        rows = verifier_keys(load_agreement(agreement_file or Path()))
    for row in rows:
        typer.echo("\t".join(value or "-" for value in row.values()))


@audit_app.command("prove")
def audit_prove(
    directory: DirOpt,
    inclusion: Annotated[
        int | None, typer.Option(help="prove this entry (sequence number) is in the tree")
    ] = None,
    consistency: Annotated[int | None, typer.Option(help="prove the tree of this size is a prefix")] = None,
    size: Annotated[int | None, typer.Option(help="the tree size (default: the whole ledger)")] = None,
) -> None:
    """Print an inclusion or a consistency proof as JSON."""
    if (inclusion is None) == (consistency is None):
        raise InvalidInput("give exactly one of --inclusion SEQ or --consistency SIZE")
    service = _audit_service(directory)
    with service.db:
        proof = (
            service.inclusion(inclusion, size)
            if inclusion is not None
            else service.consistency(consistency or 0, size)
        )
    typer.echo(json.dumps(proof, indent=2))


@audit_app.command("export")
def audit_export(
    directory: DirOpt,
    out: Annotated[Path, typer.Option(help="where to write the bundle (JSON)")],
    start: Annotated[int, typer.Option("--from", help="first entry")] = 0,
    end: Annotated[
        int | None,
        typer.Option(
            "--to", help="one past the last entry (default: the checkpoint's size, at most 10,000 entries)"
        ),
    ] = None,
) -> None:
    """Write an audit bundle: entries with RFC 9162 inclusion proofs, the cosigned checkpoint, and a
    consistency proof from the first checkpoint that covered them."""
    _check_new_file("--out", out)
    service = _audit_service(directory)
    with service.db:
        data = service.export(start, end)
    _write_new_file("--out", out, json.dumps(data, indent=1))
    first, last = data["entries"][0]["index"], data["entries"][-1]["index"]
    size = data["checkpoint"].split("\n")[1]
    typer.echo(f"wrote entries {first}..{last} proven against the checkpoint of size {size} to {out}")


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(help="where the two demo nodes live (recreated if empty or an earlier demo's)")
    ] = Path("keys/demo"),
) -> None:
    """Run two nodes on SQLite and exchange a request and its response between them."""
    from exchange.demo import run_demo

    run_demo(workdir)


def _usage_error(exc: Exception) -> str:
    """One line for a command-line usage error (unknown command, missing or bad option)."""
    format_message = getattr(exc, "format_message", None)
    message = format_message() if callable(format_message) else str(exc)
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", "") if ctx is not None else ""
    line = " ".join(str(message).split())
    return f"error: {command + ': ' if command else ''}{line} (see --help)"


def main() -> None:
    """Entry point: one-line errors, non-zero exits."""
    try:
        result = app(standalone_mode=False)
        if isinstance(result, int) and result != 0:
            sys.exit(result)
    except (click.exceptions.Abort, typer.Abort):
        sys.exit(130)
    except (click.ClickException, typer.TyperException) as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # type: ignore[union-attr]
            sys.exit(2)
        typer.echo(_usage_error(exc), err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except LedgerIntegrityError as exc:
        typer.echo(f"error: ledger verification FAILED: {exc}", err=True)
        sys.exit(1)
    except ExchangeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ValidationError as exc:
        typer.echo(f"error: {exc.errors()[0].get('msg')} at {exc.errors()[0].get('loc')}", err=True)
        sys.exit(2)
    except OSError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except UnicodeDecodeError as exc:  # a file that is not text; its bytes are not echoed
        typer.echo(f"error: a file is not UTF-8 text (byte {exc.start}: {exc.reason})", err=True)
        sys.exit(2)
