"""Migrations are the schema: applied from empty they give exactly the models, both ways."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from mailproc import db
from mailproc.models import Base


def test_migrations_produce_the_models_schema(database_url: str) -> None:
    database = db.Database(database_url)
    try:
        db.upgrade(database)
        assert db.current_revision(database) == db.head_revision()
        with database.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        database.dispose()


def test_downgrade_to_empty_and_back(database_url: str) -> None:
    database = db.Database(database_url)
    try:
        db.upgrade(database)
        db.upgrade(database, "head")  # a second run changes nothing
        from alembic import command

        config = db.alembic_config()
        with database.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        assert "message" not in inspect(database.engine).get_table_names()
        db.upgrade(database)
        assert "message" in inspect(database.engine).get_table_names()
    finally:
        database.dispose()


def test_sqlite_runs_in_wal_mode_with_full_sync(sqlite_url: str) -> None:
    database = db.Database(sqlite_url)
    try:
        with database.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        database.dispose()
