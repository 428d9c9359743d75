"""The database engine: SQLite through aiosqlite (embedded default) or PostgreSQL through asyncpg.

One :class:`Database` per process owns the engine and the session factory. Code opens one
``AsyncSession`` per unit of work (``async with db.sessions() as s``), never one per live session.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any, Final

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

__all__ = ["Database", "DatabaseUnavailable"]

CHECK_TIMEOUT_S: Final = 5.0
# What each SQLite connection is set to: WAL lets readers run beside the writer; synchronous=FULL
# makes a committed transcript row survive power loss; SQLite leaves foreign keys off by default.
SQLITE_PRAGMAS: Final = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=5000",
)


class DatabaseUnavailable(Exception):
    """The database did not answer; the message never contains the URL's password."""


class Database:
    """Owns the async engine and the session factory; :meth:`aclose` is idempotent."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        parsed = make_url(url)
        self.dialect: str = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"echo": echo}
        if self.dialect == "sqlite":
            kwargs["connect_args"] = {"timeout": 30, "factory": _RollbackOnClose}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=10, pool_recycle=1800)
            # Fail fast when the server is unreachable instead of hanging on connect.
            kwargs["connect_args"] = {"timeout": CHECK_TIMEOUT_S}
        self.engine: AsyncEngine = create_async_engine(parsed, **kwargs)
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_on_connect)
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"Database(dialect={self.dialect!r})"

    async def check(self) -> None:
        """Run ``SELECT 1``; raise :class:`DatabaseUnavailable` with a short reason if it fails."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except TimeoutError:
            raise DatabaseUnavailable(f"no answer within {CHECK_TIMEOUT_S:g} s") from None
        except (SQLAlchemyError, OSError) as exc:
            cause = exc.orig if isinstance(exc, SQLAlchemyError) and hasattr(exc, "orig") else exc
            raise DatabaseUnavailable(type(cause).__name__) from None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.engine.dispose()


class _RollbackOnClose(sqlite3.Connection):
    """A SQLite connection that ends its open transaction when it is closed.

    SQLAlchemy closes an aiosqlite connection whose task was cancelled mid-transaction instead of
    returning it to the pool. ``sqlite3`` closes with ``sqlite3_close_v2``, which only defers the
    close while a statement is unfinished: a SELECT whose rows were never read, held by the
    cancelled task's traceback. Until that cursor is garbage, the connection keeps its transaction
    and SQLite's write lock, and every other writer waits out ``busy_timeout`` and fails with
    "database is locked". Rolling back first releases the lock at once.
    """

    def close(self) -> None:
        if self.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.rollback()
        super().close()


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()
