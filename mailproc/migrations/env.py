"""Alembic environment: runs on the connection ``mailproc.db.upgrade`` hands over, or on the
database of the current mailproc configuration when Alembic is driven by hand."""

from __future__ import annotations

from alembic import context

from mailproc.models import Base

target_metadata = Base.metadata


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        from mailproc.config import load_settings
        from mailproc.db import Database

        database = Database(load_settings(None).database.url)
        with database.engine.begin() as connection:
            _migrate(connection)
        database.dispose()
    else:
        _migrate(connection)


def _migrate(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
