"""Latency by design on SQLite (one process per node): a submission wakes the delivery loop in
process, so it is delivered long before the fallback poll (set to 30 s here) would have run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import Running, start_nodes
from tests.e2e.test_processes import POLL, delivered_within
from tests.support import rfi

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Running]]:
    yield from start_nodes(tmp_path_factory, options={"delivery_poll_seconds": POLL})


def test_a_submission_is_delivered_at_once_in_process_not_at_the_next_poll(
    nodes: tuple[Running, Running],
) -> None:
    polri, _ = nodes
    with polri.client() as api:
        delivered_within(polri, api.submit(rfi())["id"], POLL / 3)  # warm connections
        took = [delivered_within(polri, api.submit(rfi())["id"], POLL / 3) for _ in range(5)]
    print(f"\n[latency, SQLite] submit to receipt (ms): {[round(t * 1000) for t in took]}")
    assert max(took) < 1.0
