"""Schema migrations (alembic), run in-process on the application's own engine.

``parley migrate`` upgrades to the newest revision; ``parley serve`` refuses to start on a database
that is behind, so a deployment never runs code against a schema it does not know.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from storage.db import Database
from storage.models import Base

__all__ = ["current_revision", "head_revision", "schema_drift", "upgrade"]

MIGRATIONS_DIR: Final = Path(__file__).with_name("migrations")


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:
        raise RuntimeError("no migrations found")
    return head


async def current_revision(db: Database) -> str | None:
    """The revision the database is at, or None for an empty database."""

    def read(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    async with db.engine.connect() as conn:
        return await conn.run_sync(read)


async def upgrade(db: Database, revision: str = "head") -> None:
    """Upgrade the schema in one transaction (PostgreSQL) or as far as SQLite allows."""

    def run(conn: Connection) -> None:
        command.upgrade(_config(conn), revision)

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


async def downgrade(db: Database, revision: str) -> None:
    def run(conn: Connection) -> None:
        command.downgrade(_config(conn), revision)

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


async def schema_drift(db: Database) -> list[object]:
    """Differences between the models and the migrated database; empty when they agree."""

    def compare(conn: Connection) -> list[object]:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return list(compare_metadata(ctx, Base.metadata))

    async with db.engine.connect() as conn:
        return await conn.run_sync(compare)


def autogenerate(db_url_sync_conn: Connection, message: str) -> None:
    """Developer helper: write a new revision from the difference between models and database."""
    command.revision(_config(db_url_sync_conn), message=message, autogenerate=True)
