"""Event feeds: numbering, resume without gap or repeat, slow subscribers, the end, linger, shutdown."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from relay.session.feed import FeedRegistry, Outcome, ResumeAhead, ResumeGap, Subscription


def event(n: int) -> dict[str, Any]:
    return {"type": "transcript.delta", "speaker": "coach", "item_id": "item_1", "delta": f"word{n} "}


def publish(registry: FeedRegistry, session_id: str, first: int, last: int) -> None:
    feed = registry.open(session_id)
    for n in range(first, last + 1):
        feed.publish(event(n))


async def drain(sub: Subscription) -> list[dict[str, Any]]:
    """Everything the subscription delivers until it stops."""
    return [json.loads(e.text) async for e in sub]


async def take(sub: Subscription, count: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(count):
        got = await asyncio.wait_for(sub.next(), 1.0)
        assert got is not None
        out.append(json.loads(got.text))
    return out


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in events]


async def test_events_are_numbered_in_publishing_order() -> None:
    """Each published event comes back as its JSON plus seq 1, 2, ... in order."""
    feeds = FeedRegistry()
    feed = feeds.open("ses_a")
    sub = feed.subscribe()
    for n in range(1, 6):
        feed.publish(event(n))
    got = await take(sub, 5)
    assert seqs(got) == [1, 2, 3, 4, 5]
    assert got[2] == {**event(3), "seq": 3}
    assert feed.last_seq == 5
    await feeds.aclose()


@pytest.mark.parametrize("after", [0, 1, 7, 12, 15])
async def test_resume_delivers_every_later_event_once(after: int) -> None:
    """subscribe(after=n) yields the held events n+1.. then live ones: no gap, no repeat."""
    feeds = FeedRegistry()
    publish(feeds, "ses_a", 1, 15)
    sub = feeds.subscribe("ses_a", after=after)
    backlog = await take(sub, 15 - after)
    publish(feeds, "ses_a", 16, 20)
    live = await take(sub, 5)
    assert seqs(backlog + live) == list(range(after + 1, 21))
    await feeds.aclose()


async def test_resume_while_reading_live_is_seamless() -> None:
    """A subscriber that drops mid-stream and resumes from its last seq sees 1..N exactly once."""
    feeds = FeedRegistry()
    feed = feeds.open("ses_a")
    first = feed.subscribe()
    seen: list[int] = []
    for n in range(1, 11):
        feed.publish(event(n))
        if n == 4:
            seen += seqs(await take(first, 4))
            first.close()  # the socket dropped after seq 4
    publish(feeds, "ses_a", 11, 12)
    second = feeds.subscribe("ses_a", after=seen[-1])
    feed.close()
    seen += seqs(await drain(second))
    assert seen == list(range(1, 13))
    await feeds.aclose()


async def test_without_after_the_feed_starts_at_the_oldest_event_held() -> None:
    """No after: everything still held, from the oldest, whatever was already dropped."""
    feeds = FeedRegistry(history=8, max_lag=4)
    publish(feeds, "ses_a", 1, 20)
    sub = feeds.subscribe("ses_a")
    assert seqs(await take(sub, 8)) == list(range(13, 21))
    await feeds.aclose()


async def test_resume_from_dropped_events_is_refused() -> None:
    """An after older than the held history raises ResumeGap; the oldest resumable point still works."""
    feeds = FeedRegistry(history=8, max_lag=4)
    publish(feeds, "ses_a", 1, 20)  # holds 13..20
    feed = feeds.open("ses_a")
    assert feed.oldest_seq == 13
    with pytest.raises(ResumeGap) as gap:
        feed.subscribe(after=11)
    assert (gap.value.after, gap.value.oldest) == (11, 13)
    assert feeds.stats.resume_gaps == 1
    sub = feed.subscribe(after=12)
    assert seqs(await take(sub, 8)) == list(range(13, 21))
    await feeds.aclose()


async def test_resume_ahead_of_the_feed_is_refused() -> None:
    """An after beyond the last seq raises ResumeAhead; a fresh feed refuses anything above 0."""
    feeds = FeedRegistry()
    publish(feeds, "ses_a", 1, 3)
    with pytest.raises(ResumeAhead):
        feeds.subscribe("ses_a", after=4)
    assert feeds.subscribe("ses_a", after=3).outcome is None
    with pytest.raises(ResumeAhead):
        feeds.subscribe("ses_new", after=1)
    assert feeds.get("ses_new") is None  # the refused subscriber left no feed behind
    await feeds.aclose()


async def test_a_slow_subscriber_is_cut_off_and_a_fast_one_keeps_everything() -> None:
    """Past max_lag untaken events the slow subscriber stops (SLOW_CONSUMER); the fast one and the
    publisher are unaffected, and the slow one can resume from its last seq."""
    feeds = FeedRegistry(history=64, max_lag=8)
    feed = feeds.open("ses_a")
    fast, slow = feed.subscribe(), feed.subscribe()
    fast_seen: list[int] = []
    for n in range(1, 41):
        feed.publish(event(n))
        fast_seen += seqs(await take(fast, 1))
        if n <= 2:
            await take(slow, 1)  # then it stops reading
        assert (slow.outcome is None) == (n <= 2 + 8)
    assert fast.outcome is None and fast_seen == list(range(1, 41))
    assert slow.stopped.done() and slow.stopped.result() is Outcome.SLOW_CONSUMER
    assert await slow.next() is None  # nothing more after the cut, although events are held
    assert feeds.stats.cut_offs == 1 and feeds.stats.subscribers == 1
    resumed = feed.subscribe(after=slow.last_taken)
    assert slow.last_taken == 2
    feed.close()
    assert seqs(await drain(resumed)) == list(range(3, 41))
    await feeds.aclose()


async def test_a_resume_backlog_does_not_count_as_lag() -> None:
    """A subscriber resuming with more held events than max_lag is not cut off for it."""
    feeds = FeedRegistry(history=64, max_lag=4)
    publish(feeds, "ses_a", 1, 50)
    sub = feeds.subscribe("ses_a", after=0)
    publish(feeds, "ses_a", 51, 54)  # four live events on top of a 50-event backlog
    assert sub.outcome is None
    assert seqs(await take(sub, 54)) == list(range(1, 55))
    await feeds.aclose()


async def test_a_subscriber_whose_next_event_is_dropped_is_cut_off() -> None:
    """A resumed subscriber that falls out of the held history is cut off, never handed a gap."""
    feeds = FeedRegistry(history=8, max_lag=8)
    publish(feeds, "ses_a", 1, 8)
    sub = feeds.subscribe("ses_a", after=0)
    publish(feeds, "ses_a", 9, 9)  # seq 1, which it still needs, is dropped
    assert sub.outcome is Outcome.SLOW_CONSUMER
    await feeds.aclose()


async def test_close_delivers_the_tail_then_ends() -> None:
    """After close, subscribers get what was published, then the end (ENDED); later events are dropped."""
    feeds = FeedRegistry()
    feed = feeds.open("ses_a")
    sub = feed.subscribe()
    publish(feeds, "ses_a", 1, 3)
    feed.close()
    feed.close()  # idempotent
    feed.publish(event(4))
    assert seqs(await drain(sub)) == [1, 2, 3]
    assert sub.outcome is Outcome.ENDED
    late = feed.subscribe(after=1)  # resuming during the linger still gets the tail
    assert seqs(await drain(late)) == [2, 3]
    assert feeds.stats.subscribers == 0
    await feeds.aclose()


async def test_a_waiting_subscriber_wakes_for_new_events_and_for_the_end() -> None:
    """A subscriber blocked on next() is woken by publish and by close."""
    feeds = FeedRegistry()
    feed = feeds.open("ses_a")
    sub = feed.subscribe()
    waiting = asyncio.create_task(drain(sub))
    await asyncio.sleep(0.01)
    feed.publish(event(1))
    await asyncio.sleep(0.01)
    feed.publish(event(2))
    feed.close()
    assert seqs(await asyncio.wait_for(waiting, 1.0)) == [1, 2]
    await feeds.aclose()


async def test_a_closed_feed_lingers_then_is_dropped() -> None:
    """Closed feeds stay resumable for linger_s, then leave the registry: no growth over many sessions."""
    feeds = FeedRegistry(linger_s=0.05)
    for n in range(100):
        feed = feeds.open(f"ses_{n}")
        feed.publish(event(n))
        feed.close()
    assert len(feeds) == 100 and feeds.get("ses_7") is not None
    await asyncio.sleep(0.2)
    assert len(feeds) == 0 and feeds.get("ses_7") is None
    await feeds.aclose()


async def test_an_early_subscriber_sees_the_session_start_on_the_same_feed() -> None:
    """A subscriber may open a feed before its session; the session's open() then claims that feed."""
    feeds = FeedRegistry()
    sub = feeds.subscribe("ses_a")
    feed = feeds.open("ses_a")
    assert sub.feed is feed and feed.claimed
    feed.publish({"type": "session.state", "status": "connecting"})
    feed.publish({"type": "session.state", "status": "live"})
    assert [e["status"] for e in await take(sub, 2)] == ["connecting", "live"]
    await feeds.aclose()


async def test_an_unclaimed_feed_goes_with_its_last_subscriber() -> None:
    """Subscribers alone cannot grow the registry: an unclaimed feed is dropped when they leave,
    while a session's feed stays until it closes and lingers out."""
    feeds = FeedRegistry()
    first, second = feeds.subscribe("ses_a"), feeds.subscribe("ses_a")
    first.close()
    first.close()  # idempotent
    assert feeds.get("ses_a") is not None
    second.close()
    assert feeds.get("ses_a") is None and len(feeds) == 0
    feeds.open("ses_b").subscribe().close()
    assert feeds.get("ses_b") is not None
    assert feeds.stats.subscribers == 0 and feeds.stats.subscriptions == 3
    await feeds.aclose()


async def test_an_unencodable_event_is_dropped_without_raising() -> None:
    """publish never raises into the session: an event that is not JSON is dropped, its seq unused."""
    feeds = FeedRegistry()
    feed = feeds.open("ses_a")
    feed.publish({"type": "error", "code": object()})
    feed.publish(event(1))
    assert feed.last_seq == 1
    await feeds.aclose()


async def test_aclose_stops_everyone_and_is_idempotent() -> None:
    """aclose: every subscriber stops with GOING_AWAY, feeds and linger timers are gone; twice is fine."""
    feeds = FeedRegistry(linger_s=60.0)
    live = feeds.open("ses_live")
    sub = live.subscribe()
    lingering = feeds.open("ses_done")
    lingering.close()
    waiting = asyncio.create_task(drain(sub))
    await asyncio.sleep(0)
    await feeds.aclose()
    await feeds.aclose()
    assert await asyncio.wait_for(waiting, 1.0) == []
    assert sub.outcome is Outcome.GOING_AWAY and sub.stopped.result() is Outcome.GOING_AWAY
    assert len(feeds) == 0 and feeds.stats.subscribers == 0
    live.publish(event(1))  # a session still draining publishes into nothing
    late = feeds.open("ses_late")
    assert late.closed and feeds.get("ses_late") is None
    assert feeds.subscribe("ses_late").outcome is Outcome.GOING_AWAY
