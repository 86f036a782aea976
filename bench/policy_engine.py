"""The rule engine alone: decisions per second on realistic messages, one core.

Each decision is the whole release path of the core: evaluate every rule of the default agreement for
the action (obligations then checks) and apply the redactions to a copy of the payload. Messages:
a child-victim referral (three victims with names, parents, school and documents), an RFI with a
suspect and an informant, and a repatriation with family tracing; readers: an analyst (identities
redacted), child protection (whole) and an investigator. Also submit and receive decisions.

    .venv/bin/python bench/policy_engine.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exchange.messages import Catalogue, Message, MessageSubmission, Origin, draft_from_submission
from exchange.policy import Actor, Use, decide, redacted_payload
from tests.unit.helpers import agreement as unit_agreement

AGREEMENT = unit_agreement()
CATALOGUE = Catalogue.for_agreement(AGREEMENT)
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
STATUS = {"ID": "TRAFFICKING_VICTIM", "MY": "ILLEGAL_MIGRANT"}


def _person(pseudonym: str, n: int) -> dict[str, Any]:
    return {
        "subject": pseudonym,
        "names": [f"Full Name {n}"],
        "aliases": [f"Alias {n}"],
        "date_of_birth": "2011-03-04",
        "parents": [f"Father {n}", f"Mother {n}"],
        "address": f"Jalan {n}, Kupang, NTT",
        "school": f"SMPN {n} Kupang",
        "phone_numbers": [f"+62 812 000 {n:04d}"],
        "documents": [{"kind": "PASSPORT", "number": f"C{n:07d}", "issuing_country": "IDN"}],
        "remarks": "Found during a labour inspection " * 4,
    }


def _message(body: dict[str, Any]) -> Message:
    return draft_from_submission(
        MessageSubmission.model_validate(body),
        agreement=AGREEMENT,
        catalogue=CATALOGUE,
        sender="ID",
        origin=Origin(agency="Polri", unit="TPPO"),
        now=NOW,
        checkpoint=None,
    )


def messages() -> list[Message]:
    common = {
        "case_ref": "ID-MY/2026/0042",
        "classification": {"scheme": "POLRI", "level": "RAHASIA"},
        "tlp": "AMBER",
        "handling_codes": ["H0", "H2"],
        "legal_basis": ["Polri-PDRM police cooperation agreement"],
    }
    children = [
        {
            "pseudonym": f"VCT-{i:04d}",
            "role": "VICTIM_CHILD",
            "status": STATUS,
            "age": {"years": 12 + i, "basis": "ESTIMATED"},
        }
        for i in range(3)
    ]
    referral = _message(
        {
            **common,
            "type": "VICTIM_IDENTIFICATION_REFERRAL",
            "purposes": ["VICTIM_IDENTIFICATION", "TIP_INVESTIGATION"],
            "data_subjects": children,
            "payload": {
                "summary": "Three girls from NTT found in a Johor restaurant " * 10,
                "victims": [_person(c["pseudonym"], i) for i, c in enumerate(children)],
                "indicators": ["passport withheld", "debt bondage", "no wages"],
                "needs": ["SHELTER", "FAMILY_TRACING"],
            },
        }
    )
    rfi = _message(
        {
            **common,
            "type": "REQUEST_FOR_INFORMATION",
            "purposes": ["TIP_INVESTIGATION", "STRATEGIC_ANALYSIS"],
            "data_subjects": [
                {"pseudonym": "SUS-0001", "role": "SUSPECT"},
                {"pseudonym": "INF-0001", "role": "INFORMANT", "handler_ref": "HDL-0042"},
                {
                    "pseudonym": "VCT-0100",
                    "role": "VICTIM_ADULT",
                    "status": STATUS,
                    "age": {"years": 24, "basis": "CLAIMED"},
                },
            ],
            "payload": {
                "summary": "Recruitment network via Batam " * 20,
                "questions": ["Is the recruiter known?", "Entries at Johor Bahru?"],
                "persons": [_person("SUS-0001", 10), _person("INF-0001", 11), _person("VCT-0100", 12)],
            },
        }
    )
    repatriation = _message(
        {
            **common,
            "type": "VICTIM_REPATRIATION",
            "purposes": ["VICTIM_PROTECTION_REPATRIATION"],
            "data_subjects": [*children[:1], {"pseudonym": "REL-0001", "role": "WITNESS"}],
            "payload": {
                "subject": "VCT-0000",
                "victim": _person("VCT-0000", 20),
                "handover_point": "Entikong border post",
                "handover_at": "2026-12-01T09:00:00+07:00",
                "escort": "Polda Kalbar",
                "receiving_agency": "BP2MI",
                "family_tracing": {
                    "required": True,
                    "status": "FOUND",
                    "relatives": [
                        {
                            "subject": "VCT-0000",
                            "relationship": "MOTHER",
                            "names": ["Mother 21"],
                            "address": "Kupang",
                        }
                    ],
                },
            },
        }
    )
    return [referral, rfi, repatriation]


def readers() -> list[Actor]:
    base: dict[str, Any] = {
        "agency": "PDRM",
        "clearance": "S",
        "message_types": frozenset(AGREEMENT.message_types),
        "purposes": frozenset(AGREEMENT.purposes),
        "cases": None,
        "party": "MY",
        "police": True,
    }
    return [
        Actor(client_id="pdrm-analyst", unit="ANALYSIS", roles=frozenset({"ANALYST"}), **base),
        Actor(client_id="pdrm-d11", unit="D11", roles=frozenset({"CHILD_PROTECTION"}), **base),
        Actor(client_id="pdrm-d7", unit="ATIPSOM", roles=frozenset({"INVESTIGATOR"}), **base),
    ]


def run(label: str, work: list[tuple[Any, ...]], seconds: float, release: bool) -> float:
    cycle = itertools.cycle(work)
    done, redacted = 0, 0
    start = time.perf_counter()
    cpu_start = time.process_time()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(200):
            action, message, actor, use = next(cycle)
            decision = decide(action, agreement=AGREEMENT, message=message, actor=actor, use=use, now=NOW)
            if release and decision.allowed:
                redacted_payload(message, decision)
                redacted += len(decision.redactions)
        done += 200
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    rate = done / cpu  # per CPU second of this one thread: robust to other load on the machine
    extra = f", {redacted / done:.1f} values redacted each" if release else ""
    print(
        f"  {label:<46} {rate:>9,.0f} decisions per CPU-s ({1e6 / rate:.1f} µs each{extra});"
        f" wall {done / elapsed:,.0f}/s"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    seconds = parser.parse_args().seconds
    corpus = messages()
    people = readers()
    print(f"rule engine, {len(AGREEMENT.rules)} rules in the agreement, one core, {seconds:.0f} s per line")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    release_work = [
        ("release", m, a, Use(a.purposes & frozenset(m.purposes))) for m in corpus for a in people
    ]
    rate = run("release + redaction (3 messages x 3 readers)", release_work, seconds, release=True)
    analyst = [w for w in release_work if w[2].client_id == "pdrm-analyst"]
    run("release + redaction, analyst only", analyst, seconds, release=True)
    run(
        "submit (floors, completeness, entitlements)",
        [("submit", m, people[2], None) for m in corpus],
        seconds,
        False,
    )
    run("receive (floors re-evaluated)", [("receive", m, None, None) for m in corpus], seconds, False)
    print(f"target >= 20,000 decisions/s with redaction: {'met' if rate >= 20_000 else 'NOT met'}")


if __name__ == "__main__":
    main()
