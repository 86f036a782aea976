"""``make demo``: two nodes on SQLite, a development PKI, a request and its response.

Runs the real CLI and real servers as subprocesses, exactly as an operator would, then prints a
readable summary. Leaves the two node directories under the work directory for inspection.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exchange.client import ExchangeClient
from exchange.errors import ExchangeError

PARTIES = (
    ("ID", "Polri (Indonesia)", "polri-cms", "RAHASIA", "TPPO"),
    ("MY", "PDRM (Malaysia)", "pdrm-d7", "RAHSIA", "ATIPSOM"),
)
#: further PDRM systems of the demo: (name, clearance, unit, role)
PDRM_EXTRA = (
    ("pdrm-analyst", "RAHSIA", "ANALYSIS", "ANALYST"),
    ("pdrm-d11", "RAHSIA", "D11", "CHILD_PROTECTION"),
)


#: ports for servers started here are picked below the kernel's ephemeral range, so that no
#: outgoing connection (to PostgreSQL, to a node) takes one between its pick and the server's bind
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A loopback TCP port free now, chosen at random below the ephemeral range (where the
    kernel picks the ports of outgoing connections) when there is room, else any free port."""
    try:
        ephemeral_low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 0
    if ephemeral_low > 12_000:
        for _ in range(100):
            port = 10_000 + secrets.randbelow(ephemeral_low - 10_000)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exchange_cli(*args: str, env: dict[str, str]) -> str:
    """Run the ``exchange`` CLI; raises ExchangeError with its stderr if it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", "exchange", *args], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise ExchangeError(f"`exchange {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout


class NodeProcess:
    """A node server (``exchange serve``) as a child process: start, wait ready, stop or kill.

    ``args`` are further options of ``exchange serve``; ``log_name`` the log file in the node
    directory (another process of the same node logs to another file)."""

    def __init__(
        self,
        node_dir: Path,
        env: dict[str, str],
        ready_client: Callable[[], ExchangeClient],
        args: tuple[str, ...] = (),
        log_name: str = "node.log",
    ) -> None:
        self.dir = node_dir
        self.env = env
        self.ready_client = ready_client
        self.args = args
        self.log = node_dir / log_name
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "exchange", "serve", "--dir", str(self.dir), *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 30) -> None:
        """Block until the node answers /healthz over mTLS. Raises ExchangeError if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise ExchangeError(f"node in {self.dir} exited; see {self.log}")
            try:
                with self.ready_client() as c:
                    c.health()
                return
            except Exception as exc:  # not up yet: refused, reset, TLS not ready
                if time.monotonic() > deadline:
                    raise ExchangeError(f"node in {self.dir} did not become ready: {exc}") from exc
                time.sleep(0.1)

    def stop(self) -> bool:
        """SIGTERM the server; True if it completed a graceful shutdown (lifespan, worker)."""
        if self.process is None:
            return False
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
                return False
        return "Application shutdown complete" in self.log.read_text()

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class DemoNode:
    """A demo node directory, its local system's certificate, and its server process."""

    def __init__(
        self, root: Path, party: str, label: str, client: str, clearance: str, unit: str, env: dict[str, str]
    ) -> None:
        self.dir = root / party.lower()
        self.party, self.label, self.client_name, self.clearance = party, label, client, clearance
        self.unit = unit
        self.port = free_port()
        self.env = env
        self.server = NodeProcess(self.dir, env, self.client)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def init(self) -> None:
        exchange_cli(
            "init", "--party", self.party, "--dir", str(self.dir), "--port", str(self.port), env=self.env
        )

    def setup(self, agreement: Path, database_url: str | None = None) -> None:
        shutil.copy(agreement, self.dir / "agreement.toml")
        with (self.dir / "node.toml").open("a") as settings:
            settings.write("checkpoint_interval_seconds = 1.0\n")
            if database_url is not None:
                settings.write(f"database_url = {json.dumps(database_url)}\n")
        exchange_cli("db", "upgrade", "--dir", str(self.dir), env=self.env)
        self.add_client(self.client_name, self.clearance, self.unit, "INVESTIGATOR")

    def add_client(self, name: str, clearance: str, unit: str, role: str) -> None:
        """Issue a certificate for a local system and register it (every type and purpose)."""
        exchange_cli(
            "pki",
            "issue-client",
            "--dir",
            str(self.dir),
            "--name",
            name,
            "--out",
            str(self.dir / "clients"),
            env=self.env,
        )
        exchange_cli(
            "clients",
            "add",
            "--dir",
            str(self.dir),
            "--id",
            name,
            "--cert",
            str(self.dir / "clients" / f"{name}.pem"),
            "--agency",
            self.label.split()[0],
            "--unit",
            unit,
            "--clearance",
            clearance,
            "--role",
            role,
            "--type",
            "ALL",
            "--purpose",
            "ALL",
            env=self.env,
        )

    def client(self, name: str | None = None) -> ExchangeClient:
        """A client of the node's API with the certificate of ``name`` (default: its first system)."""
        name = name or self.client_name
        return ExchangeClient(
            self.url,
            ca_file=self.dir / "tls" / "ca.pem",
            cert_file=self.dir / "clients" / f"{name}.pem",
            key_file=self.dir / "clients" / f"{name}-key.pem",
            key_password=self.env["EXCHANGE_CLIENT_KEY_PASSPHRASE"],
        )


def _line(label: str, value: Any) -> None:
    print(f"  {label:<28} {value}")


def set_up_pair(
    root: Path, *extra_settings: str, database_urls: tuple[str | None, str | None] = (None, None)
) -> tuple[DemoNode, DemoNode]:
    """Two initialised nodes under ``root`` sharing one agreement, migrated, each with a registered
    local system; a fresh passphrase for this run only. ``extra_settings`` are node.toml lines;
    ``database_urls`` (Polri's, PDRM's) replace the SQLite file in the node directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    env["EXCHANGE_KEY_PASSPHRASE"] = secrets.token_urlsafe(24)  # generated per run, never stored
    env["EXCHANGE_CLIENT_KEY_PASSPHRASE"] = secrets.token_urlsafe(24)  # the local systems' own
    polri, pdrm = (DemoNode(root, *spec, env=env) for spec in PARTIES)
    for node in (polri, pdrm):
        node.init()
    agreement = root / "agreement.toml"
    exchange_cli(
        "agreement",
        "compose",
        "--party",
        str(polri.dir / "party.toml"),
        "--party",
        str(pdrm.dir / "party.toml"),
        "--out",
        str(agreement),
        env=env,
    )
    for node, url in zip((polri, pdrm), database_urls, strict=True):
        node.setup(agreement, url)
    for extra in PDRM_EXTRA:
        pdrm.add_client(*extra)
    polri.add_client("polri-supervisor", "RAHASIA", "TPPO", "SUPERVISOR")
    for node in (polri, pdrm):
        with (node.dir / "node.toml").open("a") as settings:
            settings.writelines(line + "\n" for line in extra_settings)
    return polri, pdrm


#: the file that marks a folder as the demo's own, which a later demo may delete
DEMO_MARKER = ".exchange-demo"


def run_demo(workdir: Path) -> None:
    """Set up and run the two-node demo in ``workdir``, recreated (only if it is empty or an
    earlier demo's: a node's folder given by mistake is never deleted).

    Raises:
        ExchangeError: ``workdir`` holds something else, or a step failed.
    """
    if workdir.exists():
        if not (workdir / DEMO_MARKER).is_file() and any(workdir.iterdir()):
            raise ExchangeError(
                f"{workdir} is not empty and not an earlier demo's folder (no {DEMO_MARKER}): not deleting"
                " it;"
                " choose another --workdir"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / DEMO_MARKER).write_text("made by `exchange demo`; deleted by the next one\n")
    print("== Setting up two nodes (development PKI, encrypted keys, SQLite) in", workdir)
    polri, pdrm = nodes = list(set_up_pair(workdir))
    for node in nodes:
        node.server.start()
    try:
        for node in nodes:
            node.server.wait_ready()
        print(f"== Nodes up: ID at {polri.url}, MY at {pdrm.url} (mutual TLS)")
        _conversation(polri, pdrm)
        _child_victim(polri, pdrm)
        _tlp_red(polri, pdrm)
        _consent(polri, pdrm)
        _return_or_destroy(polri, pdrm)
        _key_rotation(polri, pdrm)
        _new_agreement(workdir, polri, pdrm)
        _checkpoints(polri, pdrm)
    finally:
        clean = [node.server.stop() for node in nodes]
    if not all(clean):
        raise ExchangeError("a node did not shut down cleanly; see node.log in the work directory")
    print("== Both nodes shut down gracefully (SIGTERM, delivery worker stopped)")
    for node in nodes:
        out = exchange_cli("audit", "verify", "--dir", str(node.dir), env=node.env).strip()
        print(f"  {node.party} {out}")
    print("== Demo passed")


def _wait_cosigned(api: ExchangeClient, timeout: float = 30) -> dict[str, Any]:
    """Wait until the node's latest checkpoint covers its whole ledger and the partner cosigned it."""
    deadline = time.monotonic() + timeout
    while True:
        health = api.health()
        if health["cosigned_size"] == health["ledger_size"] > 0:
            return health
        if time.monotonic() > deadline:
            raise ExchangeError(f"the checkpoint was not cosigned in {timeout}s: {health}")
        time.sleep(0.2)


def _conversation(polri: DemoNode, pdrm: DemoNode) -> None:
    rfi = {
        "type": "REQUEST_FOR_INFORMATION",
        "case_ref": "ID-MY/2026/0042",
        "purposes": ["TIP_INVESTIGATION"],
        "classification": {"scheme": "POLRI", "level": "RAHASIA"},
        "tlp": "AMBER",
        "handling_codes": ["H0", "H2"],
        "legal_basis": ["Polri-PDRM police cooperation agreement", "Palermo Protocol art. 10"],
        "priority": "URGENT",
        "addressed_to": ["ATIPSOM"],
        "data_subjects": [{"pseudonym": "RCR-0193", "role": "SUSPECT"}],
        "payload": {
            "summary": "Recruitment network moving workers from NTT via Batam to Johor",
            "questions": ["Is recruiter pseudonym RCR-0193 known to PDRM?", "Any entries at Johor Bahru?"],
            "persons": [{"subject": "RCR-0193", "aliases": ["Pak Haji"]}],
        },
    }
    with polri.client() as polri_api, pdrm.client() as pdrm_api:
        t0 = time.monotonic()
        accepted = polri_api.submit(rfi)
        delivered = polri_api.wait_for_status(accepted["id"], "delivered")
        print(f"\n-- 1. Polri system '{polri.client_name}' sent a REQUEST_FOR_INFORMATION")
        cls = accepted["classification"]
        _line("message id", accepted["id"])
        _line("classification (Indonesia)", f"{cls['level']} ({cls['scheme']}, common level {cls['common']})")
        _line(
            "equivalent in Malaysia",
            f"{cls['partner_equivalent']['level']} ({cls['partner_equivalent']['scheme']})",
        )
        _line("status", f"{delivered['status']} in {time.monotonic() - t0:.2f}s")
        _line("signed receipt", f"from MY at {delivered['receipt']['received_at']}")

        page = pdrm_api.inbox()
        item = next(i for i in page["items"] if i["id"] == accepted["id"])
        print(f"\n-- 2. PDRM system '{pdrm.client_name}' pulled its inbox ({len(page['items'])} message)")
        _line("case", item["case_ref"])
        _line("marking kept", f"{item['classification']['level']} ({item['classification']['scheme']})")
        _line("protected in Malaysia as", item["classification"]["local_equivalent"])
        _line("questions", len(item["payload"]["questions"]))

        reply = {
            "type": "RESPONSE",
            "case_ref": item["case_ref"],
            "in_reply_to": item["id"],
            "purposes": ["TIP_INVESTIGATION"],
            "classification": {"scheme": "ARAHAN", "level": "SULIT"},
            "tlp": "AMBER",
            "handling_codes": ["H0", "H2"],
            "legal_basis": ["Polri-PDRM police cooperation agreement"],
            "payload": {
                "outcome": "ANSWERED",
                "answers": [
                    {"question": 0, "answer": "Known: RCR-0193 is under PDRM D7 surveillance since March."},
                    {"question": 1, "answer": "Three entries via Stulang Laut in October."},
                ],
            },
        }
        t1 = time.monotonic()
        answered = pdrm_api.submit(reply)
        done = pdrm_api.wait_for_status(answered["id"], "delivered")
        cls = answered["classification"]
        print(f"\n-- 3. PDRM replied with a RESPONSE in the same thread ({answered['thread_id'][:8]}…)")
        _line("classification (Malaysia)", f"{cls['level']} ({cls['scheme']}, common level {cls['common']})")
        _line("equivalent in Indonesia", f"{cls['partner_equivalent']['level']} (mapped up, never down)")
        _line("status", f"{done['status']} in {time.monotonic() - t1:.2f}s")

        back = polri_api.inbox()
        got = next(i for i in back["items"] if i["id"] == answered["id"])
        print(f"\n-- 4. Polri system pulled the reply ({len(back['items'])} message)")
        _line("in reply to", got["in_reply_to"])
        _line("marking kept", f"{got['classification']['level']} ({got['classification']['scheme']})")
        _line("protected in Indonesia as", got["classification"]["local_equivalent"])
        _line("outcome", got["payload"]["outcome"])


CHILD_NAME = "Siti Rahmawati"  # fictitious, as every identity of the demo


def _child_victim(polri: DemoNode, pdrm: DemoNode) -> None:
    referral = {
        "type": "VICTIM_IDENTIFICATION_REFERRAL",
        "case_ref": "ID-MY/2026/0042",
        "purposes": ["VICTIM_IDENTIFICATION", "VICTIM_PROTECTION_REPATRIATION"],
        "classification": {"scheme": "POLRI", "level": "BIASA"},
        "tlp": "GREEN",
        "handling_codes": ["H0"],
        "legal_basis": ["Polri-PDRM police cooperation agreement", "UU 35/2014 (child protection)"],
        "data_subjects": [
            {
                "pseudonym": "VCT-0007",
                "role": "VICTIM_CHILD",
                "status": {"ID": "TRAFFICKING_VICTIM", "MY": "ILLEGAL_MIGRANT"},
                "age": {"years": 15, "basis": "ESTIMATED"},
            }
        ],
        "payload": {
            "summary": "A girl from NTT found working in a Johor restaurant; the employer holds her passport",
            "victims": [
                {
                    "subject": "VCT-0007",
                    "names": [CHILD_NAME],
                    "parents": ["Yohanes Rahmawan", "Maria Goreti"],
                    "school": "SMPN 2 Kupang",
                    "documents": [{"kind": "PASSPORT", "number": "C1234567", "issuing_country": "IDN"}],
                }
            ],
            "needs": ["SHELTER", "FAMILY_TRACING"],
        },
    }
    with polri.client() as polri_api:
        accepted = polri_api.submit(referral)
        polri_api.wait_for_status(accepted["id"], "delivered")
    cls = accepted["classification"]
    print("\n-- 6. Polri referred a child victim, submitted as BIASA, TLP:GREEN")
    for change in accepted["raised"]:
        _line(f"raised by {change['rule']}", f"{change['kind']} {change['from'] or '-'} -> {change['to']}")
    _line("final classification", f"{cls['level']} ({cls['scheme']}); TLP {accepted['tlp']}")
    _line("arrives in Malaysia as", cls["partner_equivalent"]["level"])
    for who, label in (("pdrm-analyst", "PDRM analyst"), ("pdrm-d11", "PDRM child-protection (D11)")):
        with pdrm.client(who) as api:
            item = next(i for i in api.inbox()["items"] if i["id"] == accepted["id"])
        victim = item["payload"]["victims"][0]
        shown = "whole" if CHILD_NAME in str(victim) else f"pseudonymised as {victim['names'][0]}"
        _line(label, f"{item['classification']['local_equivalent']}: the child's identity {shown}")
        if item["redacted"]:
            _line("  redacted paths", ", ".join(r["path"] for r in item["redacted"]))
        if (CHILD_NAME in str(victim)) != (who == "pdrm-d11"):
            raise ExchangeError(f"the child's identity was shown wrongly to {who}")


def _tlp_red(polri: DemoNode, pdrm: DemoNode) -> None:
    red = {
        "type": "SPONTANEOUS_INTELLIGENCE",
        "case_ref": "ID-MY/2026/0042",
        "purposes": ["TIP_INVESTIGATION"],
        "classification": {"scheme": "POLRI", "level": "RAHASIA"},
        "tlp": "RED",
        "recipients": [pdrm.client_name],
        "legal_basis": ["Polri-PDRM police cooperation agreement"],
        "grading": {"source": "B", "information": 2},
        "payload": {"summary": "A transfer of workers is planned through Tawau next week"},
    }
    with polri.client() as polri_api:
        accepted = polri_api.submit(red)
        polri_api.wait_for_status(accepted["id"], "delivered")
    print(f"\n-- 7. Polri sent TLP:RED intelligence to its named recipient '{pdrm.client_name}' only")
    for who in (pdrm.client_name, "pdrm-analyst", "pdrm-d11"):
        with pdrm.client(who) as api:
            got = any(i["id"] == accepted["id"] for i in api.inbox()["items"])
        _line(who, "received it" if got else "not released (R-TLP-RED)")
        if got != (who == pdrm.client_name):
            raise ExchangeError(f"TLP:RED was released wrongly to {who}")


def _until(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise ExchangeError(f"{what} did not happen in {timeout}s")
        time.sleep(0.1)
    return value


def _consent(polri: DemoNode, pdrm: DemoNode) -> None:
    body = {
        "type": "SPONTANEOUS_INTELLIGENCE",
        "case_ref": "ID-MY/2026/0042",
        "purposes": ["TIP_INVESTIGATION"],
        "classification": {"scheme": "POLRI", "level": "RAHASIA"},
        "tlp": "AMBER",
        "handling_codes": ["H0", "H2"],
        "legal_basis": ["Polri-PDRM police cooperation agreement"],
        "grading": {"source": "B", "information": 2},
        "payload": {"summary": "The recruiter RCR-0193 is wanted in Indonesia; last seen in Johor Bahru"},
    }
    with polri.client() as polri_api:
        sent = polri_api.submit(body)
        polri_api.wait_for_status(sent["id"], "delivered")
    release = {"recipient": "INTERPOL", "purposes": ["TIP_INVESTIGATION"]}
    print("\n-- 8. PDRM wants to pass Polri's intelligence (H2) to the Interpol bureau")
    with pdrm.client() as api:
        refused = api.request("POST", f"/v1/messages/{sent['id']}/releases", json=release)
        _line(
            "release to INTERPOL",
            f"{refused.status_code}: {', '.join(v['rule'] for v in refused.json()['violations'])}",
        )
        asked = api.request(
            "POST",
            f"/v1/messages/{sent['id']}/consent-requests",
            json={**release, "justification": "an Interpol red notice for the recruiter"},
        ).json()
        _line("consent request", f"sent to Indonesia ({asked['id'][:8]}…)")
    with polri.client("polri-supervisor") as boss:
        _until(
            lambda: boss.request("GET", "/v1/consent-requests", params={"status": "pending"}).json()["items"],
            "the consent request's arrival",
        )
        expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).isoformat(timespec="seconds")
        boss.request(
            "POST",
            f"/v1/consent-requests/{asked['id']}/decision",
            json={"decision": "GRANTED", "expires_at": expires, "conditions": "for the red notice only"},
        )
        _line("Polri supervisor", f"granted it for INTERPOL until {expires}")
    with pdrm.client() as api:
        done = _until(
            lambda: (
                (r := api.request("POST", f"/v1/messages/{sent['id']}/releases", json=release)).status_code
                == 200
                and r
            ),
            "the consent's arrival",
        )
        _line("release to INTERPOL", f"{done.status_code}: allowed under the consent, ledgered on both nodes")
        other = api.request(
            "POST", f"/v1/messages/{sent['id']}/releases", json={**release, "recipient": "ASEANAPOL"}
        )
        _line("release to ASEANAPOL", f"{other.status_code}: no consent names it")
        if refused.status_code != 403 or other.status_code != 403:
            raise ExchangeError("an onward release was allowed without the originator's consent")


def _short_request(case_ref: str, level: str, summary: str, question: str) -> dict[str, Any]:
    """A request for information from Polri with one question, amber, under the agreement."""
    return {
        "type": "REQUEST_FOR_INFORMATION",
        "case_ref": case_ref,
        "purposes": ["TIP_INVESTIGATION"],
        "classification": {"scheme": "POLRI", "level": level},
        "tlp": "AMBER",
        "legal_basis": ["Polri-PDRM police cooperation agreement"],
        "payload": {"summary": summary, "questions": [question]},
    }


def _return_or_destroy(polri: DemoNode, pdrm: DemoNode) -> None:
    with polri.client() as polri_api:
        in_error = _short_request("ID-MY/2026/0043", "RAHASIA", "Sent in error", "Please destroy")
        sent = polri_api.submit(in_error)
        polri_api.wait_for_status(sent["id"], "delivered")
        polri_api.request(
            "POST", f"/v1/messages/{sent['id']}/return-or-destroy", json={"reason": "sent to the wrong case"}
        )
    print("\n-- 9. Polri asked PDRM to destroy a message sent in error")
    with pdrm.client() as api:
        gone = _until(
            lambda: (r := api.request("GET", f"/v1/messages/{sent['id']}/content")).status_code == 410 and r,
            "the destruction",
        ).json()
        _line("PDRM reads it", f"410: destroyed at {gone['destroyed_at']}")
    _until(lambda: _certified(polri), "the destruction certificate")
    _line("destruction certificate", "signed by PDRM, verified and ledgered by Polri")


def _certified(node: DemoNode) -> bool:
    import sqlite3

    with sqlite3.connect(node.dir / "node.db") as conn:
        return bool(
            conn.execute("select 1 from ledger_entries where event = 'destruction.certified'").fetchone()
        )


def _key_rotation(polri: DemoNode, pdrm: DemoNode) -> None:
    print("\n-- 10. Polri rotates its message signing key while the nodes run")
    where = ("--dir", str(polri.dir))
    rotated = exchange_cli("keys", "rotate", *where, "--purpose", "signing", "--wait", "20", env=polri.env)
    for line in rotated.strip().splitlines():
        _line("exchange keys rotate", line)
    activated = exchange_cli(
        "keys", "activate", *where, "--purpose", "signing", "--wait", "20", env=polri.env
    )
    for line in activated.strip().splitlines():
        _line("exchange keys activate", line)
    with polri.client() as api:
        request = _short_request("ID-MY/2026/0044", "TERBATAS", "Signed with the new key", "Received?")
        sent = api.submit(request)
        api.wait_for_status(sent["id"], "delivered")
        health = api.health()["key_sets"]
    _line("a message under the new key", "delivered, verified by PDRM with the announced key")
    _line(
        "key sets", f"ID version {health['version']} acknowledged by MY ({health['unacknowledged']} pending)"
    )


def _new_agreement(workdir: Path, polri: DemoNode, pdrm: DemoNode) -> None:
    """Both forces install a later version of the agreement while the nodes run: held at once, in
    force from its effective_from, with a purpose the first version did not have."""
    import tomllib

    import tomli_w

    print("\n-- 11. Both forces install a new version of the agreement while the nodes run")
    data = tomllib.loads((workdir / "agreement.toml").read_text())
    effective = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=8)
    data.update(version=f"{data['version']}.1", effective_from=effective.isoformat())
    data["purposes"]["VICTIM_SUPPORT"] = "Support of an identified victim"
    data["message_types"]["REQUEST_FOR_INFORMATION"]["purposes"].append("VICTIM_SUPPORT")
    path = workdir / "agreement-next.toml"
    path.write_text(tomli_w.dumps(data))
    for node in (polri, pdrm):
        out = exchange_cli("agreement", "install", "--dir", str(node.dir), str(path), env=node.env)
        _line(f"{node.party}: agreement install", out.strip())
    with polri.client() as api:

        def holds_it() -> dict[str, Any] | None:
            agreement: dict[str, Any] = api.health()["agreement"]
            return agreement if data["version"] in agreement["held"] else None

        held = _until(holds_it, "the new agreement version held")
        _line("held by ID, before it applies", f"{held['held']}, in force: {held['version']}")
        _until(lambda: api.health()["agreement"]["version"] == data["version"], "the new version in force")
        _line("in force from", f"{effective.isoformat()}, without a restart")
        request = _short_request("ID-MY/2026/0045", "TERBATAS", "A victim's support needs", "Shelter?")
        sent = api.submit({**request, "purposes": ["VICTIM_SUPPORT"]})
        api.wait_for_status(sent["id"], "delivered")
    _line("a purpose only it defines", "VICTIM_SUPPORT accepted by ID, delivered to and verified by MY")


def _checkpoints(polri: DemoNode, pdrm: DemoNode) -> None:
    with polri.client() as polri_api, pdrm.client() as pdrm_api:
        print("\n-- 12. Each node signs a checkpoint of its ledger; the other verifies it and cosigns")
        for label, api in (("ID", polri_api), ("MY", pdrm_api)):
            health = _wait_cosigned(api)
            _line(
                f"{label} ledger",
                f"{health['ledger_size']} entries, checkpoint at size {health['checkpoint_size']}"
                f" cosigned by the partner (outbox {health['outbox']})",
            )
