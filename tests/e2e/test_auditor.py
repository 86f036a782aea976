"""Auditors: the read-only role over the audit API and the console in a real headless browser."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exchange.client import ExchangeClient
from exchange.ledger.merkle import verify_consistency, verify_inclusion
from tests.e2e.harness import Running
from tests.support import CLIENT_PASSPHRASE, ClientFiles, cli, register_client, response_to, rfi
from tests.unit.test_auditor_guide import block

pytestmark = pytest.mark.e2e
SECRET = "PAYLOAD-SECRET-RECRUITER-NAME-0193"


@pytest.fixture(scope="module")
def audited(nodes: tuple[Running, Running]) -> tuple[Running, ClientFiles, str]:
    """A conversation on the nodes, an auditor registered on ID, and a checkpoint cosigned."""
    polri, pdrm = nodes
    auditor = register_client(polri.node, "auditor-1", "BIASA", "--role", "AUDITOR")
    with polri.client() as id_api, pdrm.client() as my_api:
        sent = id_api.submit(
            rfi(case_ref="ID-MY/2026/AUDIT", payload={"summary": SECRET, "questions": [SECRET]})
        )
        id_api.wait_for_status(sent["id"], "delivered")
        my_api.inbox()
        reply = my_api.submit(response_to(sent["id"], case_ref="ID-MY/2026/AUDIT"))
        my_api.wait_for_status(reply["id"], "delivered")
        id_api.inbox()
        deadline = time.monotonic() + 30
        while (h := id_api.health())["cosigned_size"] != h["ledger_size"]:
            assert time.monotonic() < deadline, h
            time.sleep(0.2)
    return polri, auditor, sent["id"]


def auditor_api(run: Running, files: ClientFiles) -> ExchangeClient:
    return run.client(files)


def test_auditors_see_entries_checkpoints_and_proofs_never_content(
    audited: tuple[Running, ClientFiles, str],
) -> None:
    polri, auditor, message_id = audited
    with auditor_api(polri, auditor) as api:
        everything = api.request("GET", "/v1/audit/entries", params={"limit": 1000})
        assert everything.status_code == 200
        assert SECRET not in everything.text
        for item in everything.json()["items"]:  # the raw leaf, which hashes to the tree's leaf hash
            assert hashlib.sha256(b"\x00" + item["leaf"].encode()).hexdigest() == item["leaf_hash"]
            assert json.loads(item["leaf"])["seq"] == item["seq"]
        history = api.request("GET", "/v1/audit/entries", params={"message": message_id}).json()["items"]
        assert [e["event"] for e in history][:3] == ["message.submitted", "message.sent", "receipt.verified"]
        both = api.request("GET", f"/v1/audit/messages/{message_id}").json()
        assert both["partner_error"] is None
        assert {e["event"] for e in both["nodes"]["MY"]} >= {
            "envelope.received",
            "receipt.issued",
            "message.released",
        }
        assert {e["event"] for e in both["nodes"]["ID"]} >= {"message.submitted", "receipt.verified"}
        assert SECRET not in json.dumps(both)
        by_case = api.request("GET", "/v1/audit/entries", params={"case": "ID-MY/2026/AUDIT"}).json()["items"]
        assert {e["case_ref"] for e in by_case} == {"ID-MY/2026/AUDIT"}
        by_rule = api.request("GET", "/v1/audit/entries", params={"rule": "R-CLEARANCE"}).json()["items"]
        assert by_rule
        assert all("R-CLEARANCE@1" in e["rules"] for e in by_rule)
        for edge in ("0001-01-01T00:00+01:00", "9999-12-31T23:59-01:00"):  # beyond the years in UTC
            assert api.request("GET", "/v1/audit/entries", params={"since": edge}).status_code == 422
        wildcard = api.request("GET", "/v1/audit/entries", params={"rule": "R-%"}).json()["items"]
        assert wildcard == []  # no rule is named R-%: it is not a pattern
        # a window given in another time zone selects by the instant, not by the text
        first = dt.datetime.fromisoformat(history[0]["at"])
        jakarta = dt.timezone(dt.timedelta(hours=7))
        for start, end, found in (
            (first - dt.timedelta(minutes=1), first + dt.timedelta(minutes=1), True),
            (first + dt.timedelta(seconds=1), first + dt.timedelta(minutes=1), False),
        ):
            window = {
                "message": message_id,
                "since": start.astimezone(jakarta).isoformat(),
                "until": end.astimezone(jakarta).isoformat(),
            }
            items = api.request("GET", "/v1/audit/entries", params=window).json()["items"]
            assert (history[0]["seq"] in [e["seq"] for e in items]) is found
        checkpoints = api.request("GET", "/v1/audit/checkpoints").json()
        assert checkpoints["checkpoints"][-1]["cosignature"]
        size = checkpoints["checkpoints"][-1]["size"]
        inc = api.request("GET", "/v1/audit/proofs/inclusion", params={"seq": 0, "size": size}).json()
        verify_inclusion(
            bytes.fromhex(inc["leaf_hash"]),
            0,
            size,
            [bytes.fromhex(p) for p in inc["proof"]],
            bytes.fromhex(checkpoints["checkpoints"][-1]["root"]),
        )
        con = api.request("GET", "/v1/audit/proofs/consistency", params={"old": 1, "new": size}).json()
        verify_consistency(
            1,
            size,
            [bytes.fromhex(p) for p in con["proof"]],
            bytes.fromhex(con["old_root"]),
            bytes.fromhex(con["new_root"]),
        )
        verdict = api.request("POST", "/v1/audit/verify").json()
        assert verdict["ok"] is True
        assert verdict["cosignatures"] >= 1
        assert api.request("GET", "/v1/audit/proofs/inclusion", params={"seq": 10**6}).status_code == 422


def test_roles_are_kept_apart(audited: tuple[Running, ClientFiles, str]) -> None:
    polri, auditor, _ = audited
    with auditor_api(polri, auditor) as api:
        assert api.request("GET", "/v1/inbox").status_code == 403  # auditors never get content
        assert api.request("POST", "/v1/messages", json=rfi()).status_code == 403
    with polri.client() as api:  # a local system is not an auditor
        assert api.request("GET", "/v1/audit/entries").status_code == 403
        assert api.request("GET", "/audit").status_code == 403


def test_an_exported_bundle_verifies_offline_and_a_tampered_one_does_not(
    audited: tuple[Running, ClientFiles, str], tmp_path: Path
) -> None:
    polri, auditor, _ = audited
    with auditor_api(polri, auditor) as api:
        response = api.request("GET", "/v1/audit/export", params={"from": 1})
    assert response.status_code == 200
    assert "attachment" in response.headers["content-disposition"]
    bundle = tmp_path / "bundle.json"
    bundle.write_text(response.text)
    agreement = polri.node.path / "agreement.toml"
    _check_by_hand(tmp_path, json.loads(response.text), agreement)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    offline = [
        sys.executable,
        "-m",
        "exchange",
        "audit",
        "verify",
        "--bundle",
        str(bundle),
        "--agreement",
        str(agreement),
    ]
    ok = subprocess.run(offline, capture_output=True, text=True, env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "cosigned by MY-node/witness" in ok.stdout
    stripped = json.loads(response.text)
    stripped["checkpoint"] = stripped["checkpoint"].split("\u2014 MY-node/witness")[0]
    bundle.write_text(json.dumps(stripped))
    uncosigned = subprocess.run(offline, capture_output=True, text=True, env=env, check=False)
    assert uncosigned.returncode == 1
    assert "not cosigned by the partner" in uncosigned.stderr
    allowed = subprocess.run(
        [*offline, "--allow-uncosigned"], capture_output=True, text=True, env=env, check=False
    )
    assert allowed.returncode == 0, allowed.stderr
    assert "NOT cosigned" in allowed.stdout
    data = json.loads(response.text)
    original = data["entries"][0]["leaf"]
    data["entries"][0]["leaf"] = original.replace('"event":"', '"event":"x', 1)
    assert data["entries"][0]["leaf"] != original
    bundle.write_text(json.dumps(data))
    bad = subprocess.run(offline, capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 1
    assert "altered" in bad.stderr


def _check_by_hand(tmp_path: Path, bundle: dict[str, object], agreement: Path) -> None:
    """The auditor's guide, steps 2 to 4, on a real node's bundle: public tools and the keys that
    `exchange audit keys` prints, nothing of ours."""
    keys = {
        row.split("\t")[2].split("+")[0]: row.split("\t")[2]
        for row in cli("audit", "keys", "--agreement", str(agreement)).splitlines()
    }
    work = tmp_path / "by-hand"
    work.mkdir()
    (work / "bundle.json").write_text(json.dumps(bundle))
    (work / "inclusion.py").write_text(block("inclusion"))
    included = subprocess.run(
        [sys.executable, "-I", "inclusion.py", "bundle.json"],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    )
    assert included.returncode == 0, included.stderr
    (work / "checkpoint.txt").write_text(str(bundle["checkpoint"]))
    signed = subprocess.run(
        ["bash", "-c", block("checkpoint") + block("cosignature")],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LOG_VKEY": keys["ID-node/ledger"],
            "WITNESS_VKEY": keys["MY-node/witness"],
        },
    )
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.count("Signature Verified Successfully") == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_or_skip() -> str:
    if CHROMIUM is None:
        message = "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


def test_the_console_in_a_real_browser(audited: tuple[Running, ClientFiles, str], tmp_path: Path) -> None:
    chromium = _browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    polri, auditor, message_id = audited
    os.environ["NODE_EXTRA_CA_CERTS"] = str(polri.node.ca)  # Playwright's TLS client trusts the node CA
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        context = browser.new_context(
            client_certificates=[
                {
                    "origin": polri.node.url,
                    "certPath": str(auditor.cert),
                    "keyPath": str(auditor.key),
                    "passphrase": CLIENT_PASSPHRASE,
                }
            ],
            accept_downloads=True,
            ignore_https_errors=False,
        )
        page = context.new_page()
        refused: list[str] = []  # what the content security policy blocked (an injected script would be)
        page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
        page.goto(f"{polri.node.url}/audit")
        expect(page.locator("#node")).to_have_text("ID-node/ledger")
        expect(page.locator("#entries tbody tr").first).to_be_visible()
        assert SECRET not in page.content()
        expect(page.locator("#checkpoints tbody tr").first).to_contain_text("MY-node/witness")
        expect(page.locator("#verifier-keys")).to_contain_text("ID-node/ledger+")
        expect(page.locator("#verifier-keys")).to_contain_text("MY-node/witness+")

        page.fill("input[name=event]", "message.released")
        page.click("#search")
        expect(page.locator("#entries tbody tr")).to_have_count(1)
        expect(page.locator("#entries tbody tr").first).to_contain_text("message.released")

        page.fill("input[name=event]", "")
        page.click("#search")
        page.locator(f"a.msg[title='{message_id}']").first.click()
        expect(page.locator("#history")).to_contain_text(message_id + " on both nodes")
        expect(page.locator("#entries tbody tr").first).to_contain_text("message.submitted")
        expect(page.locator("#entries tbody")).to_contain_text("receipt.verified")
        expect(page.locator("#entries tbody tr[data-node=MY]").first).to_contain_text("envelope.received")

        page.click("#verify")
        expect(page.locator("#verify-result")).to_contain_text("PASSED", timeout=20_000)

        with page.expect_download() as download_info:
            page.click("#download")
        path = tmp_path / "console-bundle.json"
        download_info.value.save_as(path)
        assert json.loads(path.read_text())["format"] == "exchange-audit-bundle/3"
        page.screenshot(path=str(tmp_path / "console.png"), full_page=True)
        assert refused == []  # the console's own script and style run under its hash-only policy
        assert (
            "unsafe-inline"
            not in context.request.get(f"{polri.node.url}/audit").headers["content-security-policy"]
        )
        context.close()
        browser.close()
    os.environ.pop("NODE_EXTRA_CA_CERTS", None)
