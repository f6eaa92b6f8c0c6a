"""Generate a migration from the models: ``python -m mailproc.migrations.new "what changed"``.

It compares the models with a scratch SQLite database brought to the current head, so it needs
no running database; review the generated file before committing it."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command

from mailproc import db


def main(message: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        database = db.Database(f"sqlite:///{Path(scratch) / 'scratch.db'}")
        try:
            db.upgrade(database)
            config = db.alembic_config()
            with database.engine.begin() as connection:
                config.attributes["connection"] = connection
                command.revision(config, message=message, autogenerate=True)
        finally:
            database.dispose()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit('usage: python -m mailproc.migrations.new "what changed"')
    main(sys.argv[1])
