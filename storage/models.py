"""Tables, as SQLAlchemy 2 typed mappings. Schema changes go through ``storage/migrations``.

Ownership cascades from ``users``: deleting a user deletes its sessions, and deleting a session
deletes its transcript, recordings, chunks, rating, secrets and jobs (``ON DELETE CASCADE``, so the
database enforces it even for rows the ORM never loaded). ``audit_events`` deliberately has no
foreign keys: the audit trail of a deleted session outlives it, and holds no content.
"""

from __future__ import annotations

import secrets
import string
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ApiKey",
    "AudioChunk",
    "AudioGap",
    "AudioRecording",
    "AuditEvent",
    "Base",
    "ClientSecret",
    "Job",
    "JobStatus",
    "Node",
    "Rating",
    "Session",
    "SessionStatus",
    "Topic",
    "TranscriptSegment",
    "User",
    "new_id",
    "utcnow",
]

_ALPHABET: Final = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    """An unguessable id such as ``ses_4f8Kq...`` (22 base62 characters, ~131 bits)."""
    return f"{prefix}_" + "".join(secrets.choice(_ALPHABET) for _ in range(22))


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use storage.models.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")

# Stable constraint names, so migrations can refer to them on both engines.
NAMING: Final = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSONType, list[Any]: JSONType}


class SessionStatus:
    """The states of DESIGN.md; stored as strings so adding one needs no enum migration."""

    CREATED: Final = "created"
    CONNECTING: Final = "connecting"
    LIVE: Final = "live"
    RECONNECTING: Final = "reconnecting"
    ENDING: Final = "ending"
    ENDED: Final = "ended"
    PROCESSING: Final = "processing"
    PROCESSED: Final = "processed"
    PROCESSING_FAILED: Final = "processing_failed"
    INTERRUPTED: Final = "interrupted"
    FAILED: Final = "failed"
    ALL: Final = (
        "created", "connecting", "live", "reconnecting", "ending", "ended",
        "processing", "processed", "processing_failed", "interrupted", "failed",
    )  # fmt: skip


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("usr"))
    # Normalised (lower-case) email for built-in accounts; NULL for users known only through OIDC.
    email: Mapped[str | None] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    oidc_issuer: Mapped[str | None] = mapped_column(String(512))
    oidc_subject: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("oidc_issuer", "oidc_subject", name="uq_users_oidc_identity"),)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("key"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    # SHA-256 of the key; the key itself is shown once and never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]


class Topic(Base):
    __tablename__ = "topics"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    difficulty: Mapped[str] = mapped_column(String(16))
    prompts: Mapped[list[Any]] = mapped_column(default=list)
    hints: Mapped[list[Any]] = mapped_column(default=list)
    # What the live session sends upstream: coaching instructions and turn-detection settings.
    instructions: Mapped[str] = mapped_column(Text, default="")
    turn_detection: Mapped[dict[str, Any] | None]
    retired_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        CheckConstraint(_in("difficulty", ("beginner", "intermediate", "advanced")), name="difficulty"),
    )


class Session(Base):
    """One practice conversation. Private by default."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("ses"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    topic_id: Mapped[str] = mapped_column(ForeignKey("topics.id", ondelete="RESTRICT"), index=True)
    status: Mapped[str] = mapped_column(String(24), default=SessionStatus.CREATED)
    visibility: Mapped[str] = mapped_column(String(8), default="private")
    # Unguessable public slug while published; NULL while private.
    public_slug: Mapped[str | None] = mapped_column(String(64), unique=True)
    published_at: Mapped[datetime | None]
    # Keep forever regardless of the deployment's retention (a learner's choice), or a per-session limit.
    retain: Mapped[bool] = mapped_column(Boolean, default=False)
    retention_days: Mapped[int | None] = mapped_column(Integer)
    # The relay node that terminated the session's WebRTC, for routing signalling when scaled out.
    node_id: Mapped[str | None] = mapped_column(String(64))
    continued_from_id: Mapped[str | None] = mapped_column(ForeignKey("sessions.id", ondelete="SET NULL"))
    end_reason: Mapped[str | None] = mapped_column(String(48))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    duration_ms: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        CheckConstraint(_in("status", SessionStatus.ALL), name="status"),
        CheckConstraint(_in("visibility", ("private", "public")), name="visibility"),
        # GET /v1/sessions: a user's sessions newest first, paginated by (created_at, id).
        Index("ix_sessions_user_created", "user_id", "created_at", "id"),
        Index("ix_sessions_status", "status"),
        # A session continues at most once (storage/continuation.py).
        Index("uq_sessions_continued_from_id", "continued_from_id", unique=True),
    )


class TranscriptSegment(Base):
    __tablename__ = "transcript_segments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("seg"))
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    # Position in the conversation (not arrival order); ties broken by start_ms.
    seq: Mapped[int] = mapped_column(Integer)
    speaker: Mapped[str] = mapped_column(String(8))
    text: Mapped[str] = mapped_column(Text)
    start_ms: Mapped[int] = mapped_column(BigInteger)
    end_ms: Mapped[int] = mapped_column(BigInteger)
    final: Mapped[bool] = mapped_column(Boolean, default=True)
    # The coach's answer was cut by a barge-in: ``text`` is what was heard.
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    item_id: Mapped[str | None] = mapped_column(String(64))
    previous_item_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        CheckConstraint(_in("speaker", ("learner", "coach")), name="speaker"),
        Index("ix_transcript_segments_session_seq", "session_id", "seq", "start_ms"),
        # A retried write of the same upstream item never duplicates it.
        UniqueConstraint("session_id", "item_id", "speaker", name="uq_transcript_segments_item"),
    )


class AudioRecording(Base):
    """One track of one session; its chunks are the source of truth until ``final_object_key`` is set."""

    __tablename__ = "audio_recordings"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("rec"))
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    track: Mapped[str] = mapped_column(String(8))
    format: Mapped[str] = mapped_column(String(32), default="ogg/opus")
    sample_rate: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), default="recording")
    duration_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    # Audio the relay knows it could not keep (e.g. spool full), declared rather than hidden.
    lost_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    final_object_key: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]

    __table_args__ = (
        CheckConstraint(_in("track", ("learner", "coach")), name="track"),
        CheckConstraint(_in("status", ("recording", "complete", "interrupted")), name="status"),
        UniqueConstraint("session_id", "track", name="uq_audio_recordings_session_track"),
    )


class AudioChunk(Base):
    """A manifest entry: one independently decodable segment, listed only after its upload succeeded."""

    __tablename__ = "audio_chunks"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    recording_id: Mapped[str] = mapped_column(ForeignKey("audio_recordings.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    start_ms: Mapped[int] = mapped_column(BigInteger)
    duration_ms: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("recording_id", "seq", name="uq_audio_chunks_recording_seq"),)


class AudioGap(Base):
    """A stretch of the session's timeline with no audio on a track (peer gone, loss), never faked."""

    __tablename__ = "audio_gaps"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    recording_id: Mapped[str] = mapped_column(ForeignKey("audio_recordings.id", ondelete="CASCADE"))
    start_ms: Mapped[int] = mapped_column(BigInteger)
    end_ms: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(32))

    __table_args__ = (Index("ix_audio_gaps_recording_start", "recording_id", "start_ms"),)


class Rating(Base):
    __tablename__ = "ratings"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("rat"))
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    scores: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    feedback: Mapped[str] = mapped_column(Text, default="")
    model: Mapped[str] = mapped_column(String(128), default="")
    error_code: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (CheckConstraint(_in("status", ("pending", "done", "failed")), name="status"),)


class ClientSecret(Base):
    """A minted client secret: only its ``jti`` and expiry, never the token."""

    __tablename__ = "client_secrets"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    scope: Mapped[str] = mapped_column(String(16), default="webrtc")
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobStatus:
    """The states of a job (``storage.jobs``): ``queued`` -> ``running`` -> ``done``, or back to
    ``queued`` (retry, expired lease), or ``dead`` (out of attempts, or a fatal error) until an
    operator retries it."""

    QUEUED: Final = "queued"
    RUNNING: Final = "running"
    DONE: Final = "done"
    DEAD: Final = "dead"
    ALL: Final = ("queued", "running", "done", "dead")


class Job(Base):
    """Post-processing work, claimed with a lease so a crashed worker's job is taken again."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("job"))
    kind: Mapped[str] = mapped_column(String(32))
    session_id: Mapped[str | None] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    run_after: Mapped[datetime] = mapped_column(default=utcnow)
    lease_expires_at: Mapped[datetime | None]
    locked_by: Mapped[str | None] = mapped_column(String(64))
    last_error_code: Mapped[str | None] = mapped_column(String(64))
    # Handler runs begun (``attempts`` counts claims): a claim whose lease was lost, or whose session
    # was fenced, before its handler began is not a run. One per done job unless a lease ran out mid-run.
    runs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        CheckConstraint(_in("status", JobStatus.ALL), name="status"),
        # The claim query: runnable jobs in order of due time.
        Index("ix_jobs_claim", "status", "run_after"),
        UniqueConstraint("kind", "session_id", name="uq_jobs_kind_session"),
    )


class AuditEvent(Base):
    """Lifecycle facts only (ids, times, states, codes); never content. Outlives what it describes."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    event: Mapped[str] = mapped_column(String(64))
    session_id: Mapped[str | None] = mapped_column(String(32))
    user_hash: Mapped[str | None] = mapped_column(String(32))
    from_status: Mapped[str | None] = mapped_column(String(24))
    to_status: Mapped[str | None] = mapped_column(String(24))
    code: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_audit_events_session", "session_id", "at"),)


class Node(Base):
    """A running ``parley serve`` process (storage/nodes.py): alive while its heartbeat is fresh.

    ``sessions.node_id`` names the node a session went live on, so signalling that reaches another
    node is forwarded to ``url``. No foreign key: a session outlives the node that served it.
    """

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Where other nodes reach this process (internal); NULL: nowhere (it takes no forwarded requests).
    url: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class SessionTombstone(Base):
    """The fence of a deleted session: every writer checks it, and it outlives the session's rows.

    It is written before anything of the session is removed, so a writer still in flight (an upload,
    a transcript write, a job, an export) sees it and stops instead of recreating what is being
    deleted. It holds the id and the time only, like the audit trail.
    """

    __tablename__ = "session_tombstones"

    session_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(default=utcnow)
