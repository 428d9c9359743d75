"""Jobs count their handler runs; sessions that ended before the job queue existed get finalized.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

``jobs.runs`` counts handler runs begun (``attempts`` counts claims). Every session already
``ended`` gets the ``finalize`` job that ending it enqueues from now on, so it is processed too.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ALPHABET = string.ascii_letters + string.digits


def _job_id() -> str:
    # As storage.models.new_id("job"); migrations do not import the models they migrate.
    return "job_" + "".join(secrets.choice(_ALPHABET) for _ in range(22))


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("runs", sa.Integer(), server_default="0", nullable=False))

    sessions = sa.table("sessions", sa.column("id", sa.String), sa.column("status", sa.String))
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("kind", sa.String),
        sa.column("session_id", sa.String),
        sa.column("status", sa.String),
        sa.column("attempts", sa.Integer),
        sa.column("max_attempts", sa.Integer),
        sa.column("run_after", sa.DateTime(timezone=True)),
        sa.column("runs", sa.Integer),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    bind = op.get_bind()
    ended = bind.execute(sa.select(sessions.c.id).where(sessions.c.status == "ended")).scalars().all()
    now = datetime.now(UTC)
    if ended:
        op.bulk_insert(
            jobs,
            [
                {
                    "id": _job_id(),
                    "kind": "finalize",
                    "session_id": sid,
                    "status": "queued",
                    "attempts": 0,
                    "max_attempts": 5,
                    "run_after": now,
                    "runs": 0,
                    "created_at": now,
                    "updated_at": now,
                }
                for sid in ended
            ],
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("runs")
