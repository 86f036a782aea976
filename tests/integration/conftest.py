"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from exchange.config import load_settings
from exchange.db.engine import upgrade
from exchange.node import Node
from tests.support import NodeDir, make_pair

Pair = tuple[NodeDir, NodeDir, Node, Node]


@pytest.fixture
def nodes(tmp_path: Path, db_urls: tuple[str | None, str | None]) -> Iterator[Pair]:
    """Two nodes (ID, MY) in this process, on SQLite or PostgreSQL, each with a registered client."""
    id_dir, my_dir = make_pair(tmp_path, db_urls)
    id_node, my_node = Node(load_settings(id_dir.path)), Node(load_settings(my_dir.path))
    yield id_dir, my_dir, id_node, my_node
    id_node.close()
    my_node.close()


@pytest.fixture
def node_pair(nodes: Pair) -> tuple[Node, Node]:
    """The two nodes (ID, MY) of ``nodes``."""
    return nodes[2], nodes[3]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database of its own, SQLite or PostgreSQL: for what a node is not needed for."""
    url = (
        f"sqlite:///{tmp_path / 'ledger.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("make_pg_database")()
    )
    upgrade(url)
    return url
