"""A new agreement version installed on running nodes (``exchange agreement install``), on SQLite
and PostgreSQL: held by both before it takes effect, in force at its ``effective_from`` without a
restart, every message judged by the version in force when it was signed, and what cannot follow
refused in one line with nothing written."""

from __future__ import annotations

import datetime as dt
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import tomli_w

from exchange import envelope
from exchange.agreement import Agreement, load_agreement
from exchange.agreement_history import Terms
from exchange.canonical import canonical_json
from exchange.config import load_settings
from exchange.db import repo
from exchange.db.schema import agreements, messages
from exchange.errors import ConfigurationError, InvalidInput
from exchange.messages import MessageSubmission, Origin, draft_from_submission
from exchange.node import Node
from exchange.observability import metrics
from exchange.observability.collector import NodeCollector
from exchange.transport.worker import DeliveryWorker
from tests.integration.test_cli import one_line_error
from tests.integration.test_cli_input import run
from tests.integration.test_metrics import samples
from tests.integration.test_node_flow import Loopback, actor
from tests.support import UNITS, NodeDir, cli, make_pair, rfi, set_node_options

SKEW = 2  # seconds: the nodes' clock_skew_seconds in this module, so that tests wait little
NEW_PURPOSE = "VICTIM_SUPPORT"
TLP_WIDER = ["CLEAR", "GREEN", "AMBER", "AMBER+STRICT", "RED", "BLACK"]  # a valid agreement, not a successor

Pair = tuple[NodeDir, NodeDir, Node, Node]


@pytest.fixture
def pair(tmp_path: Path, db_urls: tuple[str | None, str | None]) -> Iterator[Pair]:
    id_dir, my_dir = make_pair(tmp_path, db_urls)
    for nd in (id_dir, my_dir):
        set_node_options(nd.path, agreement_refresh_seconds=0.2, clock_skew_seconds=SKEW)
    id_node, my_node = Node(load_settings(id_dir.path)), Node(load_settings(my_dir.path))
    yield id_dir, my_dir, id_node, my_node
    id_node.close()
    my_node.close()


def next_version(root: Path, version: str, effective: dt.datetime, **changes: Any) -> Path:
    """A later version of the pair's agreement: a new purpose requests may serve, and ``changes``."""
    data = tomllib.loads((root / "agreement.toml").read_text())
    data.update(version=version, effective_from=effective.isoformat(), **changes)
    data["purposes"][NEW_PURPOSE] = "support of an identified victim"
    data["message_types"]["REQUEST_FOR_INFORMATION"]["purposes"].append(NEW_PURPOSE)
    path = root / f"agreement-{version}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def install(directory: Path, agreement_file: Path) -> str:
    """``exchange agreement install`` on the node in ``directory``; its output."""
    return cli("agreement", "install", "--dir", str(directory), str(agreement_file))


def wait_until(moment: dt.datetime) -> None:
    time.sleep(max(0.0, (moment - dt.datetime.now(dt.UTC)).total_seconds()))


def held(node: Node) -> list[str]:
    return [t.version for t in node.agreements.history().versions]


def wait_held(node: Node, version: str) -> None:
    deadline = time.monotonic() + 5
    while version not in held(node):
        assert time.monotonic() < deadline, f"{version} not held by the running node: {held(node)}"
        time.sleep(0.05)


def sealed_under(node: Node, terms: Terms, created: dt.datetime, **overrides: object) -> str:
    """An envelope from ``node`` signed at ``created`` naming ``terms``' version, built as submit
    builds one (a sender with its own idea of which version is in force)."""
    draft = draft_from_submission(
        MessageSubmission.model_validate(rfi(**overrides)),
        agreement=terms.agreement,
        catalogue=terms.catalogue,
        sender=node.party,
        origin=Origin(agency="Polri", unit=UNITS[node.party]),
        now=created,
        checkpoint=None,
    )
    return envelope.seal(
        draft.signed_json(), signing_key=node.keys.signing, recipient_key=node.partner.encryption
    )


def smuggle(node: Node, agreement: Agreement) -> None:
    """Write a version into the agreements table directly, around `exchange agreement install`."""
    with node.db.transaction() as conn:
        conn.execute(
            agreements.insert().values(
                version=agreement.version,
                digest=agreement.digest,
                document=canonical_json(agreement.document).decode(),
                installed_at=dt.datetime.now(dt.UTC).isoformat(),
            )
        )


def rejections(node: Node) -> list[str]:
    with node.db.read() as conn:
        return [str(e.data["reason"]) for e in repo.iter_ledger(conn) if e.event == "envelope.rejected"]


def test_an_installed_version_takes_effect_at_its_time_on_both_running_nodes(
    pair: Pair, tmp_path: Path
) -> None:
    id_dir, my_dir, id_node, my_node = pair
    polri, pdrm = actor(id_node, id_dir, "polri-cms"), actor(my_node, my_dir, "pdrm-d7")
    first = id_node.agreement.version
    effective = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2.5)
    v2 = next_version(tmp_path, "2027.1", effective)
    for nd in (id_dir, my_dir):
        assert "installed agreement 2027.1" in install(nd.path, v2)
    for node in (id_node, my_node):
        wait_held(node, "2027.1")  # both running nodes hold it, before it takes effect
        assert node.agreement.version == first

    # before: the new purpose is unknown; a message sealed now names the first version
    with pytest.raises(InvalidInput) as refused:
        id_node.submit(
            polri, MessageSubmission.model_validate(rfi(purposes=[NEW_PURPOSE])), dt.datetime.now(dt.UTC)
        )
    assert [e.field for e in refused.value.errors if NEW_PURPOSE in e.message] == ["purposes"]
    before = id_node.submit(polri, MessageSubmission.model_validate(rfi()), dt.datetime.now(dt.UTC))

    wait_until(effective)
    assert [n.agreement.version for n in (id_node, my_node)] == ["2027.1", "2027.1"]
    # the local systems as each request finds them: "ALL" purposes now covers the new one
    polri, pdrm = actor(id_node, id_dir, "polri-cms"), actor(my_node, my_dir, "pdrm-d7")
    after = id_node.submit(
        polri, MessageSubmission.model_validate(rfi(purposes=[NEW_PURPOSE])), dt.datetime.now(dt.UTC)
    )
    # the message sealed before the switch is delivered after it, under its own version
    assert DeliveryWorker(id_node, Loopback(my_node)).run_once() == 2
    items = {i["id"]: i for i in my_node.inbox(pdrm, 0, 10, dt.datetime.now(dt.UTC)).items}
    assert items[before["id"]]["agreement_version"] == first
    assert items[after["id"]]["agreement_version"] == "2027.1"
    assert items[after["id"]]["purposes"] == [NEW_PURPOSE]
    assert rejections(my_node) == []

    for node in (id_node, my_node):  # each install ledgered once, with what an auditor checks
        with node.db.read() as conn:
            installed = [e for e in repo.iter_ledger(conn) if e.event == "agreement.installed"]
        assert [(e.data["version"], e.data["effective_from"]) for e in installed] == [
            ("2027.1", effective.isoformat())
        ]
        assert installed[0].data["sha256"] == node.agreement.digest


def test_a_message_naming_a_version_not_in_force_when_it_was_signed_is_rejected(
    pair: Pair, tmp_path: Path
) -> None:
    id_dir, my_dir, id_node, my_node = pair
    effective = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=SKEW + 1.5)
    v2 = next_version(tmp_path, "2027.1", effective)
    for nd in (id_dir, my_dir):
        install(nd.path, v2)
    wait_held(id_node, "2027.1")
    wait_held(my_node, "2027.1")
    old, new = id_node.agreements.history().versions

    early = sealed_under(id_node, new, dt.datetime.now(dt.UTC))  # the new terms before they apply
    assert my_node.receive([early], dt.datetime.now(dt.UTC))[0].accepted is False
    wait_until(effective + dt.timedelta(seconds=SKEW))
    late = sealed_under(id_node, old, dt.datetime.now(dt.UTC))  # the old, superseded terms
    assert my_node.receive([late], dt.datetime.now(dt.UTC))[0].accepted is False
    assert rejections(my_node) == ["agreement-not-in-force", "agreement-not-in-force"]
    # a version the receiver never installed is not held at all
    v3 = next_version(tmp_path, "2027.2", effective + dt.timedelta(days=1))
    install(id_dir.path, v3)
    wait_held(id_node, "2027.2")
    unheld = sealed_under(id_node, id_node.agreements.history().versions[-1], dt.datetime.now(dt.UTC))
    assert my_node.receive([unheld], dt.datetime.now(dt.UTC))[0].accepted is False
    assert rejections(my_node)[-1] == "unknown-agreement"
    # the right version at the right time is accepted
    fine = sealed_under(id_node, new, dt.datetime.now(dt.UTC))
    assert my_node.receive([fine], dt.datetime.now(dt.UTC))[0].accepted is True


def test_an_install_is_idempotent_listed_and_refused_in_one_line_when_it_cannot_follow(
    pair: Pair, tmp_path: Path
) -> None:
    id_dir, _, id_node, _ = pair
    effective = dt.datetime.now(dt.UTC) + dt.timedelta(days=7)
    v2 = next_version(tmp_path, "2027.1", effective)
    assert "installed agreement 2027.1" in install(id_dir.path, v2)
    assert "installed already" in install(id_dir.path, v2)
    listed = [line.split("\t") for line in cli("agreement", "list", "--dir", str(id_dir.path)).splitlines()]
    assert [row[0] for row in listed] == [id_node.agreements.first.version, "2027.1"]
    assert listed[0][-1] == "in force"
    assert listed[1][2] == effective.isoformat()

    refused = [
        (next_version(tmp_path, "2027.2", effective + dt.timedelta(days=1), tlp=TLP_WIDER), "tlp: differs"),
        (next_version(tmp_path, "2027.3", effective - dt.timedelta(days=1)), "effective_from:"),
        (
            next_version(tmp_path, "2027.1", effective + dt.timedelta(days=2), title="other"),
            "another document",
        ),
    ]
    for path, needle in refused:
        proc = run("agreement", "install", "--dir", str(id_dir.path), str(path))
        one_line_error(proc, 2, needle)
    with id_node.db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(agreements)).scalar() == 1
        assert len([e for e in repo.iter_ledger(conn) if e.event == "agreement.installed"]) == 1


def test_an_edited_or_smuggled_version_stops_a_start_and_is_not_taken_by_a_running_node(
    pair: Pair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    id_dir, _, id_node, _ = pair
    v2 = next_version(tmp_path, "2027.1", dt.datetime.now(dt.UTC) + dt.timedelta(days=7))
    install(id_dir.path, v2)
    wait_held(id_node, "2027.1")
    with id_node.db.transaction() as conn:  # someone loosens the installed terms in the database
        document = conn.execute(sa.select(agreements.c.document)).scalar_one()
        loosened = document.replace('"retention_days":3650', '"retention_days":36500')
        assert loosened != document
        conn.execute(agreements.update().values(document=loosened))
    with pytest.raises(ConfigurationError, match="restore the agreements table"):
        Node(load_settings(id_dir.path))
    id_node.agreements.forget()
    assert held(id_node) == [id_node.agreements.first.version, "2027.1"]  # what it read and checked, kept
    assert id_node.agreements.history().newest.agreement.digest == load_agreement(v2).digest

    with id_node.db.transaction() as conn:  # the document put back
        conn.execute(agreements.update().values(document=document))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=8)  # a version that cannot follow, added
    smuggle(id_node, load_agreement(next_version(tmp_path, "2027.2", later, tlp=TLP_WIDER)))
    id_node.agreements.forget()
    assert held(id_node) == [id_node.agreements.first.version, "2027.1"]
    incidents = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SECURITY INCIDENT")]
    assert len(incidents) == 1
    assert "2027.2" in incidents[0]
    assert "tlp: differs" in incidents[0]
    with pytest.raises(ConfigurationError, match="tlp: differs"):
        Node(load_settings(id_dir.path))


def test_an_installed_version_deleted_from_the_table_stops_a_start(pair: Pair, tmp_path: Path) -> None:
    """The ledger says it was installed: a start without it would refuse the partner's messages
    under it, or send under the older terms, as if it had never been agreed."""
    id_dir, _, id_node, _ = pair
    v2 = next_version(tmp_path, "2027.1", dt.datetime.now(dt.UTC) + dt.timedelta(days=7))
    install(id_dir.path, v2)
    with id_node.db.transaction() as conn:
        conn.execute(agreements.delete())
    with pytest.raises(ConfigurationError, match=r"ledger entry \d+ records agreement '2027.1'"):
        Node(load_settings(id_dir.path))
    proc = run("agreement", "list", "--dir", str(id_dir.path))
    one_line_error(proc, 2, "restore the agreements table")


def test_a_signing_time_backdated_past_the_switch_is_accepted_only_as_long_as_a_message_waits(
    pair: Pair, tmp_path: Path
) -> None:
    """A sender may put its created_at anywhere in the replay window (30 days): without a bound it
    could keep being judged by a superseded version for that long. A superseded version is accepted
    only until the longest a message may wait (delivery_max_wait_seconds plus the skew) after the
    switch, as a retiring signing key is."""
    id_dir, my_dir, id_node, my_node = pair
    set_node_options(my_dir.path, delivery_max_wait_seconds=1)  # another process of MY, waiting 1 s
    impatient = Node(load_settings(my_dir.path))
    try:
        effective = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
        v2 = next_version(tmp_path, "2027.1", effective)
        for nd in (id_dir, my_dir):
            install(nd.path, v2)
        for node in (id_node, my_node, impatient):
            wait_held(node, "2027.1")
        wait_until(effective + impatient.settings.longest_wait + dt.timedelta(seconds=0.2))
        old = id_node.agreements.history().versions[0]
        backdated = sealed_under(id_node, old, effective - dt.timedelta(seconds=0.5))  # "before the switch"
        assert impatient.receive([backdated], dt.datetime.now(dt.UTC))[0].accepted is False
        assert rejections(impatient) == ["agreement-superseded"]
        # a node that lets a message wait a week still takes it: it may truly have waited
        assert my_node.receive([backdated], dt.datetime.now(dt.UTC))[0].accepted is True
    finally:
        impatient.close()


def test_a_version_whose_effective_from_has_passed_is_installed_only_with_late(
    pair: Pair, tmp_path: Path
) -> None:
    id_dir, _, id_node, _ = pair
    passed = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    v2 = next_version(tmp_path, "2027.1", passed)
    one_line_error(run("agreement", "install", "--dir", str(id_dir.path), str(v2)), 2, "has passed", "--late")
    proc = run("agreement", "install", "--late", "--dir", str(id_dir.path), str(v2))
    assert proc.returncode == 0, proc.stderr
    assert "installed agreement 2027.1" in proc.stdout
    assert proc.stderr.startswith("warning: it is in force already")
    wait_held(id_node, "2027.1")
    assert id_node.agreement.version == "2027.1"
    with id_node.db.read() as conn:
        (entry,) = [e for e in repo.iter_ledger(conn) if e.event == "agreement.installed"]
    assert entry.data["late"] is True


def test_a_following_version_written_around_install_is_not_taken(
    pair: Pair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It follows the version before, but no agreement.installed entry records it: it did not come
    through `exchange agreement install`."""
    id_dir, _, id_node, _ = pair
    smuggled = load_agreement(
        next_version(tmp_path, "2027.1", dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    )
    held(id_node)  # read and trusted before the row appears
    smuggle(id_node, smuggled)
    id_node.agreements.forget()
    assert held(id_node) == [id_node.agreements.first.version]
    incidents = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SECURITY INCIDENT")]
    assert len(incidents) == 1
    assert "no agreement.installed ledger entry" in incidents[0]
    with pytest.raises(ConfigurationError, match=r"no agreement\.installed ledger entry"):
        Node(load_settings(id_dir.path))


def test_a_message_signed_under_a_version_not_yet_in_force_here_reads_under_its_own(
    pair: Pair, tmp_path: Path
) -> None:
    """Within the clock skew before the switch the partner may already send under the new version:
    what it stored reads with that version's vocabulary while the older one is still in force here."""
    id_dir, my_dir, id_node, my_node = pair
    effective = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=SKEW + 2.5)
    v2 = next_version(tmp_path, "2027.1", effective)
    for nd in (id_dir, my_dir):
        install(nd.path, v2)
    wait_held(id_node, "2027.1")
    wait_held(my_node, "2027.1")
    # just inside the skew: the rest of the test has most of it (1.8 s) before the switch here
    wait_until(effective - dt.timedelta(seconds=SKEW - 0.2))
    new = id_node.agreements.history().versions[-1]
    early = sealed_under(id_node, new, dt.datetime.now(dt.UTC), purposes=[NEW_PURPOSE])
    assert my_node.receive([early], dt.datetime.now(dt.UTC))[0].accepted is True
    assert my_node.agreement.version != "2027.1"  # still the older version here
    with my_node.db.read() as conn:
        (row,) = [r for r in conn.execute(sa.select(messages)).mappings() if r["direction"] == "in"]
    assert my_node.stored_message(dict(row)).purposes == (NEW_PURPOSE,)


def test_one_process_reads_the_versions_at_a_time_and_the_others_take_what_is_held(pair: Pair) -> None:
    """A slow read must never publish an older view over a newer one: reads are serialised, and a
    caller that finds one under way takes what is held rather than waiting on the database."""
    _, _, id_node, _ = pair
    book = id_node.agreements
    held(id_node)
    entered, release = threading.Event(), threading.Event()
    reading, most, calls = [0], [0], [0]
    original = book._read

    def slow_read(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        reading[0] += 1
        most[0] = max(most[0], reading[0])
        entered.set()
        release.wait(5)
        try:
            return original(*args, **kwargs)
        finally:
            reading[0] -= 1

    book._read = slow_read  # type: ignore[method-assign]
    book.forget()
    first = threading.Thread(target=book.history)
    first.start()
    assert entered.wait(5)
    book.forget()  # a notification while the first read is under way
    started = time.monotonic()
    assert [t.version for t in book.history().versions] == [book.first.version]  # held, at once
    assert time.monotonic() - started < 1.0
    release.set()
    first.join(5)
    assert (most[0], calls[0]) == (1, 1)
    book.history()  # the notification during the read is not lost: read again now
    assert calls[0] == 2


def test_metrics_show_the_versions_held_the_next_switch_and_the_rejections_by_reason(
    pair: Pair, tmp_path: Path
) -> None:
    id_dir, my_dir, id_node, my_node = pair
    effective = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    v2 = next_version(tmp_path, "2027.1", effective)
    install(my_dir.path, v2)
    wait_held(my_node, "2027.1")

    def seen() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(metrics.render(NodeCollector(my_node)))

    before = seen()
    first = my_node.agreements.first.version
    assert before[("exchange_agreement_versions", (("state", "in_force"), ("version", first)))] == 1
    assert before[("exchange_agreement_versions", (("state", "upcoming"), ("version", "2027.1")))] == 1
    assert before[("exchange_agreement_next_effective_timestamp_seconds", ())] == effective.timestamp()
    reason = (("reason", "unknown-agreement"),)
    # ID never installed it: what ID seals under a version of its own making is not held here
    install(id_dir.path, next_version(tmp_path, "2027.0", effective))
    wait_held(id_node, "2027.0")
    unheld = sealed_under(id_node, id_node.agreements.history().versions[-1], dt.datetime.now(dt.UTC))
    assert my_node.receive([unheld], dt.datetime.now(dt.UTC))[0].accepted is False
    after = seen()
    assert (
        after[("exchange_envelopes_rejected_total", reason)]
        == before[("exchange_envelopes_rejected_total", reason)] + 1
    )


def test_a_process_that_has_not_read_a_new_version_yet_reads_it_before_it_rejects_a_message_under_it(
    pair: Pair, tmp_path: Path
) -> None:
    """The notification is a hint and the poll may be long: a verified message naming a version this
    process does not hold makes it read the versions once before it answers unknown-agreement."""
    _, my_dir, id_node, _ = pair
    set_node_options(my_dir.path, agreement_refresh_seconds=3600)
    slow = Node(load_settings(my_dir.path))  # another process of MY, which read the versions just now
    try:
        assert held(slow) == [slow.agreements.first.version]
        v2 = next_version(tmp_path, "2027.1", dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        proc = run("agreement", "install", "--late", "--dir", str(my_dir.path), str(v2))
        assert proc.returncode == 0, proc.stderr
        under_v2 = sealed_under(id_node, Terms(load_agreement(v2)), dt.datetime.now(dt.UTC))
        assert slow.receive([under_v2], dt.datetime.now(dt.UTC))[0].accepted is True
        assert held(slow)[-1] == "2027.1"
        never = next_version(tmp_path, "2027.9", dt.datetime.now(dt.UTC) + dt.timedelta(days=9))
        unheld = sealed_under(id_node, Terms(load_agreement(never)), dt.datetime.now(dt.UTC))
        assert slow.receive([unheld], dt.datetime.now(dt.UTC))[0].accepted is False
        assert rejections(slow)[-1] == "unknown-agreement"
    finally:
        slow.close()
