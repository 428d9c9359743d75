"""The README's integration examples, executed as written against a live relay and simulator."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from tests.api import signup
from tests.live.conftest import Relay
from tests.live.test_realtime_socket import api_key, realtime
from tests.simulator.audio import silence, speech
from tests.simulator.flow import send_audio, until

README = Path(__file__).resolve().parents[2] / "README.md"


def example(name: str) -> dict[str, Any]:
    """Run the README's ``<!-- example: name -->`` code block; return what it defines."""
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no example {name!r}"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), f"README.md:{name}", "exec"), namespace)  # noqa: S102 (our own README)
    return namespace


def base_url(relay: Relay) -> str:
    return f"http://127.0.0.1:{relay.client.server.port}"


async def test_the_realtime_example_gets_an_answer_and_leaves_a_recorded_session(relay: Relay) -> None:
    """`practice()` from the README talks to the coach; the session it made has both sides' transcript."""
    learner = await signup(relay.client)
    answer = await example("realtime")["practice"](
        base_url(relay), await api_key(relay, learner), speech(5) + silence(900)
    )
    assert answer
    listed = (await (await relay.client.get("/v1/sessions", headers=learner.auth)).json())["sessions"]
    assert len(listed) == 1
    session_id = listed[0]["id"]
    async with asyncio.timeout(20):
        while True:
            segments = (
                await (
                    await relay.client.get(f"/v1/sessions/{session_id}/transcript", headers=learner.auth)
                ).json()
            )["segments"]
            if {s["speaker"] for s in segments} == {"learner", "coach"}:
                break
            await asyncio.sleep(0.1)
    assert answer in [s["text"] for s in segments]


async def test_the_event_feed_example_follows_a_session_to_its_end(relay: Relay) -> None:
    """`follow()` from the README returns the session's final transcript lines once it ends."""
    learner = await signup(relay.client)
    key = await api_key(relay, learner)
    follow = example("events")["follow"]
    async with realtime(relay, key) as (conn, session_id):
        lines = asyncio.create_task(follow(base_url(relay), key, session_id))
        await until(conn, "session.created")
        await conn.session.update(
            session={"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad"}}}}
        )
        await send_audio(conn, speech(5) + silence(900))
        await until(conn, "response.done")
    followed = await asyncio.wait_for(lines, 20)
    segments = (
        await (await relay.client.get(f"/v1/sessions/{session_id}/transcript", headers=learner.auth)).json()
    )["segments"]
    assert followed == [f"{s['speaker']}: {s['text']}" for s in segments]
    assert len(followed) >= 2
