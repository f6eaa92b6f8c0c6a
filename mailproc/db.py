"""Engines, sessions and migrations for SQLite (WAL) and PostgreSQL."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)


class LockBusy(Exception):
    """Another connection holds SQLite's write lock; nothing was written."""


# Execution option that makes SQLite take its write lock at BEGIN, so a write transaction never
# fails half-way on a lock upgrade; readers keep a plain deferred BEGIN.
_WRITE = "mailproc_write"


def _sqlite_setup(engine: Engine, durable: bool, busy_timeout_ms: int = 10000) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (fsync'd) before it returns; the 250 depends on it.
        cursor.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(_WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# What PostgreSQL's jsonb cannot hold: NUL, and a surrogate code point (never valid alone).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(value: Any) -> Any:
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_storable(key): _storable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(item) for item in value]
    return value


def json_text(value: Any) -> str:
    """JSON for a JSON column, on every backend alike. Parsed headers, bodies and evidence can
    hold NUL or a lone surrogate (a body in charset unicode_escape, say), which jsonb refuses
    and would fail the whole transaction: they are stored as U+FFFD. The raw bytes keep the
    original."""
    text = json.dumps(value)
    # json.dumps writes both as \u escapes; the look is cheap, the rewrite rarely needed.
    if "\\u0000" in text or "\\ud" in text:
        text = json.dumps(_storable(value))
    return text


def create_db_engine(url: str, durable: bool = True, wait_for_lock: bool = True) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        timeout = 10 if wait_for_lock else 0
        engine = create_engine(url, connect_args={"timeout": timeout}, json_serializer=json_text)
        _sqlite_setup(engine, durable, busy_timeout_ms=timeout * 1000)
        return engine
    engine = create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=10, json_serializer=json_text
    )
    if not durable:

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET synchronous_commit TO off")
            dbapi_connection.commit()

    return engine


class Database:
    """One engine, and sessions for reading or for one write transaction.

    ``durable=False`` lets commits return before they reach the disk (SQLite
    ``synchronous=NORMAL``, PostgreSQL ``synchronous_commit=off``): for work that can be
    redone, such as a worker's claims and verdicts, never for what a ``250`` promised. A crash
    loses at most the last such commits, never consistency; the message is processed again."""

    def __init__(self, url: str, durable: bool = True) -> None:
        self.url = url
        self.durable = durable
        self.engine = create_db_engine(url, durable)
        self._nowait_engine: Engine | None = None
        self._nowait_checkout: Any = None
        self._nowait: Any = None
        self.dialect = self.engine.dialect.name
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write_engine = self.engine.execution_options(**{_WRITE: True})
        self._write = sessionmaker(self._write_engine, expire_on_commit=False)

    @contextmanager
    def reading(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """One write transaction: committed on normal exit, rolled back on an exception."""
        with self._write() as session, session.begin():
            yield session

    @contextmanager
    def writing_connection(self) -> Iterator[Connection]:
        """One write transaction on a plain connection, for hot paths without ORM objects."""
        with self._write_engine.begin() as connection:
            yield connection

    @contextmanager
    def writing_cursor_nowait(self) -> Iterator[Any]:
        """SQLite only: one write transaction on a DBAPI cursor of a connection kept for this
        use alone, for a caller that must not block (the listener's event loop) and has a
        waiting path to fall back on. Raises ``LockBusy`` at once, having written nothing,
        when another connection holds the write lock; commits on normal exit, rolls back on
        an exception. The connection is set up like every other (WAL, ``synchronous``)."""
        if self._nowait is None:
            if self.dialect != "sqlite":
                raise LockBusy("only SQLite has a no-wait write path")
            self._nowait_engine = create_db_engine(self.url, self.durable, wait_for_lock=False)
            # Checked out of its pool for good (kept here, so it is never handed back).
            self._nowait_checkout = self._nowait_engine.raw_connection()
            self._nowait = self._nowait_checkout.driver_connection
        connection = self._nowait
        assert connection is not None
        cursor = connection.cursor()
        try:
            try:
                cursor.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise LockBusy(str(exc)) from exc
                raise
            try:
                yield cursor
                cursor.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.rollback()
                raise
        finally:
            cursor.close()

    def dispose(self) -> None:
        self.engine.dispose()
        if self._nowait_checkout is not None:
            self._nowait_checkout.close()
            self._nowait_checkout = self._nowait = None
        if self._nowait_engine is not None:
            self._nowait_engine.dispose()


def alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", "mailproc:migrations")
    return config


def upgrade(database: Database, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (by default all of them)."""
    config = alembic_config()
    with database.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Instances starting together on one database migrate one after the other.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('mailproc-migrate'))")
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(database: Database) -> str | None:
    with database.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
