"""Fixtures: a clean EXCHANGE_* environment, databases on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import CLIENT_PASSPHRASE, PASSPHRASE

PG_ADMIN_URL = os.environ.get("EXCHANGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EXCHANGE_") and name != "EXCHANGE_TEST_PG_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("EXCHANGE_KEY_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("EXCHANGE_CLIENT_KEY_PASSPHRASE", CLIENT_PASSPHRASE)


def _postgres_available() -> str | None:
    try:
        engine = sa.create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # any failure to connect means "not available"
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[sa.Engine]:
    """An AUTOCOMMIT engine on the test PostgreSQL; under CI=true its absence is a failure."""
    problem = _postgres_available()
    if problem is not None:
        message = f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {problem}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: PostgreSQL tests must run)")
        pytest.skip(message)
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture
def make_pg_database(postgres_admin: sa.Engine) -> Iterator[object]:
    """A factory of fresh PostgreSQL databases, dropped after the test."""
    created: list[str] = []

    def make() -> str:
        name = f"exchange_test_{uuid.uuid4().hex[:12]}"
        with postgres_admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    yield make
    with postgres_admin.connect() as conn:
        for name in created:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_urls(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str | None, str | None]:
    """Database URLs for a node pair: None (SQLite in the node directory) or fresh PostgreSQL."""
    if request.param == "sqlite":
        return (None, None)
    make = request.getfixturevalue("make_pg_database")
    return (make(), make())
