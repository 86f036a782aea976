"""Alembic environment: runs the project's migrations against the URL set in the config."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from exchange.db.schema import metadata

config = context.config


def run_migrations() -> None:
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
        hide_parameters=True,  # a failing statement's values (a data migration's rows) never reach a log
    )
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    connectable.dispose()


run_migrations()
