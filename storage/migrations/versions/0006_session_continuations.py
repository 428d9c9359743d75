"""A session continues at most once: ``sessions.continued_from_id`` becomes unique (storage/continuation.py).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28

Two reconnect offers racing for one interrupted session must not both open a continuation; the
unique index decides which one does, on every backend (NULLs, the sessions that continue nothing,
never collide).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("uq_sessions_continued_from_id", "sessions", ["continued_from_id"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_sessions_continued_from_id", table_name="sessions")
