"""Event feeds: the ``events`` data channel of each live session, fanned out to WebSocket subscribers.

A :class:`LiveSession` hands every event it sends the browser to its :class:`EventFeed`
(:meth:`EventFeed.publish`), which numbers it (``seq`` 1, 2, ...) and keeps the last ``history``
of them so a subscriber can resume with ``after=<seq>`` without a gap or a repeat.

Subscribers read through a cursor into that one shared history instead of a queue of their own:
memory is bounded per feed, whatever the number of subscribers, and publishing costs one
comparison and one wake-up per subscriber. The session never awaits a subscriber. A subscriber
may leave at most ``max_lag`` events published since it subscribed untaken; beyond that it is cut
off (:attr:`Outcome.SLOW_CONSUMER`) and the session and the other subscribers go on as before.
Its backlog at subscription (a resume) does not count, so resuming never cuts a subscriber off by
itself; and because ``max_lag`` is below ``history``, a subscriber that was cut off can usually
resume from its last ``seq``.

When the session ends its feed is closed: subscribers get every event already published, then the
end. A closed feed lingers ``linger_s`` for subscribers who resume right after the end, then the
registry drops it. A feed may be opened by a subscriber before its session goes live (it then sees
``session.state`` ``connecting`` and ``live``); such an *unclaimed* feed is dropped as soon as its
last subscriber leaves, so subscribers alone cannot make the registry grow.

Nothing here knows about WebSockets or close codes: ``relay/api/events.py`` maps outcomes to those.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "EventFeed",
    "FeedEvent",
    "FeedRegistry",
    "FeedStats",
    "Outcome",
    "ResumeAhead",
    "ResumeGap",
    "Subscription",
]

log = logging.getLogger("relay.session.feed")

HISTORY: Final = 1024
MAX_LAG: Final = 256
LINGER_S: Final = 60.0


class Outcome(enum.Enum):
    """Why a subscription stopped delivering."""

    ENDED = "ended"
    """The session ended and every event it published was delivered."""
    SLOW_CONSUMER = "slow_consumer"
    """The subscriber fell more than ``max_lag`` events behind and was cut off."""
    GOING_AWAY = "going_away"
    """The registry closed: this process is shutting down."""


class ResumeGap(Exception):
    """``after`` is older than the oldest event still held: events in between are gone."""

    def __init__(self, after: int, oldest: int) -> None:
        super().__init__(f"after={after} but the oldest event held is seq {oldest}")
        self.after = after
        self.oldest = oldest


class ResumeAhead(Exception):
    """``after`` is beyond the last event published: it was never handed out by this feed."""

    def __init__(self, after: int, last: int) -> None:
        super().__init__(f"after={after} but the last event published is seq {last}")
        self.after = after
        self.last = last


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One published event: its ``seq`` and its JSON text (the event plus ``"seq"``), encoded once."""

    seq: int
    text: str


@dataclass(slots=True)
class FeedStats:
    """Counters of a registry (and its feeds), for metrics: current subscribers, then totals."""

    subscribers: int = 0
    subscriptions: int = 0
    cut_offs: int = 0
    resume_gaps: int = 0


class Subscription:
    """One subscriber's cursor into a feed; iterate it (``async for``) to get events in ``seq`` order.

    Iteration ends when the subscription stops: :attr:`outcome` then says why. Cancelling
    :meth:`next` is safe: no event is taken until it is returned. :meth:`close` is idempotent.
    """

    def __init__(self, feed: EventFeed, *, first: int, live_from: int) -> None:
        self.feed = feed
        self.outcome: Outcome | None = None
        self.taken = 0
        self._next = first
        self._live_from = live_from  # events up to here are backlog: they never count as lag
        self._wake = asyncio.Event()
        # Completes with the outcome when the subscription stops, also while its reader is busy
        # elsewhere (a WebSocket send stuck on a full buffer), so the owner can cut it at once.
        self.stopped: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

    @property
    def last_taken(self) -> int:
        """The ``seq`` of the last event returned by :meth:`next` (``first - 1`` before any)."""
        return self._next - 1

    def __aiter__(self) -> AsyncIterator[FeedEvent]:
        return self

    async def __anext__(self) -> FeedEvent:
        event = await self.next()
        if event is None:
            raise StopAsyncIteration
        return event

    async def next(self) -> FeedEvent | None:
        """The next event, waiting for it to be published; ``None`` once the subscription stopped."""
        while True:
            if self.outcome is not None:
                return None
            event = self.feed._held.get(self._next)
            if event is not None:
                self._next += 1
                self.taken += 1
                return event
            if self.feed.closed:
                self._stop(Outcome.ENDED)
                return None
            self._wake.clear()
            await self._wake.wait()

    def close(self) -> None:
        """Leave the feed (the subscriber went away); idempotent."""
        self.feed._detach(self)

    # -- called by the feed ----------------------------------------------------------------------
    def _published(self, seq: int, oldest: int) -> bool:
        """Account for event ``seq``; False when it leaves this subscriber too far behind."""
        if seq - max(self._next - 1, self._live_from) > self.feed.max_lag or self._next < oldest:
            return False
        self._wake.set()
        return True

    def _stop(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.stopped.set_result(outcome)
        self._wake.set()
        self.feed._detach(self)


class EventFeed:
    """The numbered events of one session. Made by :meth:`FeedRegistry.open`, not directly."""

    def __init__(
        self,
        session_id: str,
        *,
        registry: FeedRegistry,
        history: int = HISTORY,
        max_lag: int = MAX_LAG,
    ) -> None:
        if not 0 < max_lag <= history:
            raise ValueError("max_lag must be between 1 and history")
        self.session_id = session_id
        self.history = history
        self.max_lag = max_lag
        self.closed = False
        self.claimed = False  # a session publishes here (set by FeedRegistry.open)
        self._registry = registry
        self._seq = 0
        self._held: dict[int, FeedEvent] = {}
        self._subscribers: set[Subscription] = set()

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the last event published (0 before the first)."""
        return self._seq

    @property
    def oldest_seq(self) -> int:
        """The ``seq`` of the oldest event still held (``last_seq + 1`` when none is)."""
        return self._seq - len(self._held) + 1

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, event: dict[str, Any]) -> None:
        """Number ``event``, keep it for resumes and wake every subscriber; never blocks or raises.

        A subscriber left more than ``max_lag`` events behind is cut off here. Events published
        after :meth:`close` are dropped.
        """
        if self.closed:
            return
        seq = self._seq + 1
        try:
            text = json.dumps({**event, "seq": seq}, ensure_ascii=False)
        except (TypeError, ValueError):  # a bug of the caller's; the session must go on regardless
            log.error(
                "feed.unencodable_event", extra={"session_id": self.session_id, "type": event.get("type")}
            )
            return
        self._seq = seq
        self._held[seq] = FeedEvent(seq, text)
        if len(self._held) > self.history:
            del self._held[seq - self.history]
        oldest = self.oldest_seq
        behind = [sub for sub in self._subscribers if not sub._published(seq, oldest)]
        for sub in behind:
            log.warning(
                "feed.slow_consumer",
                extra={"session_id": self.session_id, "lag": seq - sub.last_taken, "taken": sub.taken},
            )
            self._registry.stats.cut_offs += 1
            sub._stop(Outcome.SLOW_CONSUMER)

    def subscribe(self, after: int | None = None) -> Subscription:
        """A subscription from ``seq`` ``after + 1``, then live events: no gap, no repeat.

        Without ``after`` it starts at the oldest event still held (the whole session while it
        has published at most ``history`` events). Raises :class:`ResumeGap` when events after
        ``after`` were already dropped, :class:`ResumeAhead` when ``after`` was never published.
        A closed feed still serves what it holds, then ends.
        """
        oldest = self.oldest_seq
        if after is None:
            first = oldest
        elif after > self._seq:
            raise ResumeAhead(after, self._seq)
        elif after + 1 < oldest:
            self._registry.stats.resume_gaps += 1
            raise ResumeGap(after, oldest)
        else:
            first = after + 1
        sub = Subscription(self, first=first, live_from=self._seq)
        self._subscribers.add(sub)
        stats = self._registry.stats
        stats.subscribers += 1
        stats.subscriptions += 1
        if self._registry.closed:
            sub._stop(Outcome.GOING_AWAY)
        return sub

    def close(self) -> None:
        """The session ended: subscribers get what was published, then the end; idempotent."""
        if self.closed:
            return
        self.closed = True
        for sub in self._subscribers:
            sub._wake.set()
        self._registry._feed_closed(self)

    def _going_away(self) -> None:
        self.closed = True
        for sub in list(self._subscribers):
            sub._stop(Outcome.GOING_AWAY)
        self._held.clear()

    def _detach(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.discard(sub)
            self._registry.stats.subscribers -= 1
            if not self._subscribers:
                self._registry._feed_idle(self)


class FeedRegistry:
    """The event feeds of this process, by session id. :meth:`aclose` is idempotent.

    ``stats`` counts subscribers and cut-offs across every feed, for the process metrics.
    """

    def __init__(self, *, history: int = HISTORY, max_lag: int = MAX_LAG, linger_s: float = LINGER_S) -> None:
        if not 0 < max_lag <= history:
            raise ValueError("max_lag must be between 1 and history")
        self.stats = FeedStats()
        self.closed = False
        self._history = history
        self._max_lag = max_lag
        self._linger_s = linger_s
        self._feeds: dict[str, EventFeed] = {}
        self._lingering: dict[str, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._feeds)

    def get(self, session_id: str) -> EventFeed | None:
        """The session's feed while it is open or lingering after its end; else ``None``."""
        return self._feeds.get(session_id)

    def open(self, session_id: str) -> EventFeed:
        """The feed a session publishes to: the one subscribers already opened, or a new one.

        Call it before the session's status leaves ``created``, so that a subscriber never finds
        a session past ``created`` without its feed. After :meth:`aclose` the feed returned is
        already closed and held nowhere: the session's events go nowhere, harmlessly.
        """
        feed = self._feeds.get(session_id)
        if feed is None:
            feed = EventFeed(session_id, registry=self, history=self._history, max_lag=self._max_lag)
            if self.closed:
                feed.closed = True
            else:
                self._feeds[session_id] = feed
        feed.claimed = True
        return feed

    def subscribe(self, session_id: str, after: int | None = None) -> Subscription:
        """Subscribe to the session's feed, opening an unclaimed one if its session has not started.

        Raises :class:`ResumeGap` or :class:`ResumeAhead` as :meth:`EventFeed.subscribe`.
        """
        feed = self._feeds.get(session_id)
        if feed is None:
            feed = EventFeed(session_id, registry=self, history=self._history, max_lag=self._max_lag)
            if not self.closed:
                self._feeds[session_id] = feed
        try:
            return feed.subscribe(after)
        except (ResumeGap, ResumeAhead):
            if not feed.subscribers:
                self._feed_idle(feed)
            raise

    async def aclose(self) -> None:
        """Stop every subscription (:attr:`Outcome.GOING_AWAY`) and drop every feed; idempotent."""
        if self.closed:
            return
        self.closed = True
        for handle in self._lingering.values():
            handle.cancel()
        self._lingering.clear()
        feeds, self._feeds = list(self._feeds.values()), {}
        for feed in feeds:
            feed._going_away()
        log.info("feeds.closed", extra={"feeds": len(feeds)})

    # -- called by feeds -------------------------------------------------------------------------
    def _feed_closed(self, feed: EventFeed) -> None:
        if self._feeds.get(feed.session_id) is not feed:
            return
        loop = asyncio.get_running_loop()
        self._lingering[feed.session_id] = loop.call_later(self._linger_s, self._drop, feed)

    def _feed_idle(self, feed: EventFeed) -> None:
        # Nobody publishes to an unclaimed feed: once its last subscriber left it holds nothing of use.
        if not feed.claimed:
            self._drop(feed)

    def _drop(self, feed: EventFeed) -> None:
        if self._feeds.get(feed.session_id) is feed:
            del self._feeds[feed.session_id]
        handle = self._lingering.pop(feed.session_id, None)
        if handle is not None:
            handle.cancel()
