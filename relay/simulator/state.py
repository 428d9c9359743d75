"""One simulated Realtime session as a Sans-I/O state machine: client events in, server events out.

:class:`RealtimeSession` never touches a socket or a timer. The I/O layer (``server.py``) feeds it
client frames with :meth:`RealtimeSession.receive` and drains what it produced with
:meth:`RealtimeSession.drain`: server events to send, in order, and :class:`Action` values that ask
for something time-based (stream a response, deliver a transcription later). It then calls
:meth:`RealtimeSession.advance_response` once per audio chunk and
:meth:`RealtimeSession.transcribe` when a transcription is due.
"""

from __future__ import annotations

import base64
import binascii
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.simulator import formats, script, session, usage, vad
from relay.simulator.formats import AudioFormat
from relay.simulator.ids import new_id, random_padding
from relay.simulator.items import Item, assistant_item, user_audio_item
from relay.simulator.validation import ClientEventError, check_server_event, decode_client_event
from relay.simulator.voice import SAMPLE_RATE, Utterance

Event = dict[str, Any]

MIN_COMMIT_MS = 100
AUDIO_RETENTION_MS = 10 * 60_000
"""Audio kept on conversation items for ``retrieve``/``truncate``; older items lose their bytes first,
so an hour-long session does not hold an hour of audio per connection."""


@dataclass(frozen=True, slots=True)
class StreamResponse:
    """Start streaming response ``response_id``: call ``advance_response`` until it returns True."""

    response_id: str


@dataclass(frozen=True, slots=True)
class TranscribeLater:
    """Call ``transcribe(item_id)`` after the transcription delay."""

    item_id: str


Action = StreamResponse | TranscribeLater


@dataclass(slots=True, eq=False)
class _Response:
    id: str
    item: Item
    conversation_id: str | None
    modalities: list[str]
    fmt: AudioFormat
    voice: Any
    max_output_tokens: Any
    metadata: dict[str, str] | None
    words: list[str]
    utterance: Utterance
    cut_short: bool
    input_tokens: tuple[int, int]
    """(text, audio) tokens the response read."""
    position: int = 0
    words_sent: int = 0
    text: str = ""

    @property
    def audio_ms(self) -> float:
        """Audio sent so far."""
        return self.item.audio_ms

    @property
    def in_conversation(self) -> bool:
        return self.conversation_id is not None

    @property
    def audio_mode(self) -> bool:
        return "audio" in self.modalities


class RealtimeSession:
    """The protocol state of one connection: session config, input buffer, VAD, conversation, responses.

    ``strict`` checks every emitted event against the SDK's server types and raises
    :class:`~relay.simulator.validation.SimulatorDriftError` on a mismatch.
    """

    def __init__(
        self,
        *,
        model: str,
        seed: int = 0,
        chunk_ms: int = 100,
        expires_at: int = 0,
        strict: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.id = new_id("sess")
        self.config = session.default_session(self.id, model, expires_at)
        self.seed = seed
        self.chunk_ms = chunk_ms
        self.strict = strict
        self._conversation_id = new_id("conv")
        self._events: list[Event] = []
        self._actions: list[Action] = []
        self._items: list[Item] = []
        self._responses: dict[str, _Response] = {}
        self._active_default: _Response | None = None
        self._responses_created = 0
        self._voice_locked = False
        self._buffer = bytearray()
        self._buffer_start_ms = 0.0
        self._input_ms = 0.0
        self._vad: vad.EnergyVad | None = None
        self._speech_item_id: str | None = None
        self._speech_start_ms = 0
        self._idle_deadline_ms: float | None = None
        self._last_input_tokens = (0, 0)
        self._rate_limits = usage.RateLimitWindow(clock)
        self._handlers: dict[str, Callable[[Event], None]] = {
            "session.update": self._on_session_update,
            "input_audio_buffer.append": self._on_append,
            "input_audio_buffer.commit": self._on_commit,
            "input_audio_buffer.clear": self._on_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.truncate": self._on_item_truncate,
            "conversation.item.delete": self._on_item_delete,
            "conversation.item.retrieve": self._on_item_retrieve,
            "response.create": self._on_response_create,
            "response.cancel": self._on_response_cancel,
            "output_audio_buffer.clear": self._on_output_audio_buffer_clear,
        }
        self._configure_vad()

    # ----------------------------------------------------------------- draining

    def drain(self) -> tuple[list[Event], list[Action]]:
        """Return and forget the server events and actions produced since the last call."""
        events, actions = self._events, self._actions
        self._events, self._actions = [], []
        return events, actions

    def _emit(self, kind: str, **fields: Any) -> None:
        event: Event = {"type": kind, "event_id": new_id("event"), **fields}
        if self.strict:
            check_server_event(event)
        self._events.append(event)

    def error(
        self,
        code: str | None,
        message: str,
        *,
        param: str | None = None,
        event_id: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        """Emit an ``error`` event (the connection stays usable)."""
        error = {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id}
        self._emit("error", error=error)

    # ----------------------------------------------------------------- entry points

    def start(self) -> None:
        """Emit ``session.created``, always the first server event."""
        self._emit("session.created", session=self._session_json())

    def receive(self, frame: str | bytes) -> None:
        """Handle one client frame; problems become ``error`` events echoing the client's ``event_id``."""
        decoded = decode_client_event(frame)
        if isinstance(decoded, ClientEventError):
            self.error(decoded.code, decoded.message, param=decoded.param, event_id=decoded.event_id)
            return
        self._handlers[decoded["type"]](decoded)

    # ----------------------------------------------------------------- session

    def _session_json(self) -> dict[str, Any]:
        """A snapshot: queued events must not change with later updates."""
        return copy.deepcopy(self.config)

    def _on_session_update(self, event: Event) -> None:
        update: dict[str, Any] = event["session"]
        event_id = event.get("event_id")
        if update["type"] != "realtime":
            self.error(
                "invalid_value",
                f"Invalid value: '{update['type']}'. A 'realtime' session can't change its type.",
                param="session.type",
                event_id=event_id,
            )
            return
        modalities = update.get("output_modalities")
        if modalities is not None and len(set(modalities)) > 1:
            self.error(
                "invalid_value",
                "Invalid 'session.output_modalities': use either ['audio'] or ['text'], not both.",
                param="session.output_modalities",
                event_id=event_id,
            )
            return
        output = (update.get("audio") or {}).get("output") or {}
        voice = output.get("voice")
        if voice is not None and self._voice_locked and voice != self.config["audio"]["output"]["voice"]:
            self.error(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                param="session.audio.output.voice",
                event_id=event_id,
            )
            return
        old_format = self.config["audio"]["input"]["format"]
        session.apply_update(self.config, update)
        if self.config["audio"]["input"]["format"] != old_format:
            self._buffer.clear()  # buffered bytes are in the old encoding
            self._buffer_start_ms = self._input_ms
        self._configure_vad()
        self._emit("session.updated", session=self._session_json())

    @property
    def _input_format(self) -> AudioFormat:
        return AudioFormat.from_json(self.config["audio"]["input"]["format"])

    @property
    def _turn_detection(self) -> dict[str, Any] | None:
        detection: dict[str, Any] | None = self.config["audio"]["input"]["turn_detection"]
        return detection

    def _configure_vad(self) -> None:
        detection = self._turn_detection
        if detection is None:
            self._vad = None
            self._speech_item_id = None
            self._idle_deadline_ms = None
            return
        config = session.vad_config(detection)
        if detection["type"] != "server_vad":
            self._idle_deadline_ms = None
        rate = self._input_format.rate
        if self._vad is None:
            self._vad = vad.EnergyVad(config, rate)
            self._vad.position_ms = int(self._input_ms)
        else:
            self._vad.reconfigure(config, rate)

    # ----------------------------------------------------------------- input audio

    def _on_append(self, event: Event) -> None:
        try:
            data = binascii.a2b_base64(event["audio"], strict_mode=True)
        except (binascii.Error, ValueError):
            message = "Invalid 'audio'. Expected base64-encoded audio bytes."
            self.error("invalid_value", message, param="audio", event_id=event.get("event_id"))
            return
        fmt = self._input_format
        self._buffer += data
        self._input_ms += len(data) / fmt.bytes_per_ms
        detector = self._vad
        if detector is None:
            return
        for transition in detector.feed(formats.decode(fmt, data)):
            if isinstance(transition, vad.SpeechStarted):
                self._speech_started(transition.onset_ms)
            else:
                self._speech_stopped(transition.end_ms)
        if not detector.in_speech:
            self._check_idle_timeout()
            keep = (detector.config.prefix_padding_ms + 1000) * fmt.bytes_per_ms
            if len(self._buffer) > 2 * keep:
                cut = len(self._buffer) - keep
                del self._buffer[:cut]
                self._buffer_start_ms += cut / fmt.bytes_per_ms

    def _speech_started(self, onset_ms: int) -> None:
        detection = self._turn_detection
        assert self._vad is not None and detection is not None
        self._idle_deadline_ms = None
        start_ms = max(math.ceil(self._buffer_start_ms), onset_ms - self._vad.config.prefix_padding_ms)
        self._speech_item_id = new_id("item")
        self._speech_start_ms = start_ms
        self._emit("input_audio_buffer.speech_started", audio_start_ms=start_ms, item_id=self._speech_item_id)
        active = self._active_default
        if active is not None and detection.get("interrupt_response", True):
            self._finish(active, "cancelled", reason="turn_detected")

    def _speech_stopped(self, end_ms: int) -> None:
        detection = self._turn_detection
        item_id = self._speech_item_id or new_id("item")
        self._speech_item_id = None
        self._emit("input_audio_buffer.speech_stopped", audio_end_ms=end_ms, item_id=item_id)
        self._commit_span(item_id, self._speech_start_ms, end_ms)
        if detection is not None and detection.get("create_response", True) and self._active_default is None:
            self._start_response({}, event_id=None)

    def _commit_span(self, item_id: str, start_ms: float, end_ms: float) -> None:
        """Turn buffered audio from ``start_ms`` to ``end_ms`` into a user item; the rest stays buffered."""
        bpm = self._input_format.bytes_per_ms
        lo = max(0, round((start_ms - self._buffer_start_ms) * bpm))
        hi = max(lo, min(len(self._buffer), round((end_ms - self._buffer_start_ms) * bpm)))
        audio = bytearray(self._buffer[lo:hi])
        del self._buffer[:hi]
        self._buffer_start_ms += hi / bpm
        self._add_user_audio_item(item_id, audio)

    def _add_user_audio_item(self, item_id: str, audio: bytearray) -> None:
        previous = self._items[-1].id if self._items else None
        item = user_audio_item(item_id, audio, self._input_format)
        self._items.append(item)
        self._limit_retained_audio()
        self._emit("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        self._emit("conversation.item.added", previous_item_id=previous, item=item.public())
        self._emit("conversation.item.done", previous_item_id=previous, item=item.public())
        if self.config["audio"]["input"]["transcription"] is not None:
            self._actions.append(TranscribeLater(item_id))

    def _on_commit(self, event: Event) -> None:
        buffered_ms = len(self._buffer) / self._input_format.bytes_per_ms
        if buffered_ms < MIN_COMMIT_MS:
            self.error(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {buffered_ms:.2f}ms of audio.",
                event_id=event.get("event_id"),
            )
            return
        item_id = self._speech_item_id or new_id("item")
        self._speech_item_id = None
        if self._vad is not None:
            self._vad.reset()
        self._commit_span(item_id, self._buffer_start_ms, self._input_ms)

    def _on_clear(self, event: Event) -> None:
        self._buffer.clear()
        self._buffer_start_ms = self._input_ms
        self._speech_item_id = None
        if self._vad is not None:
            self._vad.reset()
        self._emit("input_audio_buffer.cleared")

    def _check_idle_timeout(self) -> None:
        deadline = self._idle_deadline_ms
        detection = self._turn_detection
        if deadline is None or detection is None or self._input_ms < deadline:
            return
        self._idle_deadline_ms = None
        item_id = new_id("item")
        start_ms = deadline - detection["idle_timeout_ms"]
        end_ms = int(self._input_ms)
        self._emit(
            "input_audio_buffer.timeout_triggered",
            item_id=item_id,
            audio_start_ms=int(start_ms),
            audio_end_ms=end_ms,
        )
        self._commit_span(item_id, max(start_ms, self._buffer_start_ms), end_ms)
        if detection.get("create_response", True) and self._active_default is None:
            self._start_response({}, event_id=None)

    # ----------------------------------------------------------------- conversation items

    def _find(self, item_id: str) -> Item | None:
        for item in self._items:
            if item.id == item_id:
                return item
        return None

    def _item_not_found(self, item_id: str, action: str, event: Event) -> None:
        self.error(
            "item_not_found",
            f"Error {action} item: the item with id '{item_id}' does not exist.",
            param="item_id",
            event_id=event.get("event_id"),
        )

    def _on_item_create(self, event: Event) -> None:
        data: dict[str, Any] = dict(event["item"])
        event_id = event.get("event_id")
        previous_id = event.get("previous_item_id")
        if data.get("id") is not None and self._find(data["id"]) is not None:
            self.error(
                "invalid_value",
                f"Item with id '{data['id']}' already exists.",
                param="item.id",
                event_id=event_id,
            )
            return
        if previous_id not in (None, "root") and self._find(previous_id) is None:
            self.error(
                "item_not_found",
                f"Error adding item: the previous item with id '{previous_id}' does not exist.",
                param="previous_item_id",
                event_id=event_id,
            )
            return
        audio: bytearray | None = None
        for index, part in enumerate(data.get("content") or []):
            if part.get("type") == "output_audio":
                self.error(
                    "invalid_value",
                    "Clients can't create assistant audio content; use 'output_text'.",
                    param=f"item.content[{index}].type",
                    event_id=event_id,
                )
                return
            if part.get("type") == "input_audio" and part.get("audio"):
                audio = bytearray(base64.b64decode(part["audio"]))
        data["id"] = data.get("id") or new_id("item")
        data.setdefault("status", "completed")
        item = Item(data, audio, self._input_format if audio is not None else None)
        if previous_id is None:
            position = len(self._items)
        elif previous_id == "root":
            position = 0
        else:
            position = 1 + next(i for i, other in enumerate(self._items) if other.id == previous_id)
        self._items.insert(position, item)
        previous = self._items[position - 1].id if position > 0 else None
        self._emit("conversation.item.added", previous_item_id=previous, item=item.public())
        self._emit("conversation.item.done", previous_item_id=previous, item=item.public())

    def _on_item_truncate(self, event: Event) -> None:
        item_id: str = event["item_id"]
        item = self._find(item_id)
        if item is None:
            self._item_not_found(item_id, "truncating", event)
            return
        content = item.data.get("content") or []
        is_audio = item.data.get("role") == "assistant" and any(
            p.get("type") == "output_audio" for p in content
        )
        if not is_audio or item.fmt is None or item.audio is None:
            self.error(
                "invalid_value",
                "Only model output audio messages can be truncated.",
                param="item_id",
                event_id=event.get("event_id"),
            )
            return
        if event["content_index"] != 0:
            self.error(
                "invalid_value",
                f"Invalid 'content_index': the item has no content part {event['content_index']}.",
                param="content_index",
                event_id=event.get("event_id"),
            )
            return
        end_ms: int = event["audio_end_ms"]
        if end_ms > item.audio_ms:
            self.error(
                "invalid_value",
                f"Audio content of {int(item.audio_ms)}ms is already shorter than {end_ms}ms.",
                param="audio_end_ms",
                event_id=event.get("event_id"),
            )
            return
        for response in list(self._responses.values()):
            if response.item is item:
                self._finish(response, "cancelled", reason="client_cancelled")
        del item.audio[end_ms * item.fmt.bytes_per_ms :]
        for part in content:
            if part.get("type") == "output_audio":
                part["transcript"] = ""
        self._emit("conversation.item.truncated", item_id=item_id, content_index=0, audio_end_ms=end_ms)

    def _on_item_delete(self, event: Event) -> None:
        item_id: str = event["item_id"]
        item = self._find(item_id)
        if item is None:
            self._item_not_found(item_id, "deleting", event)
            return
        for response in list(self._responses.values()):
            if response.item is item:
                self._finish(response, "cancelled", reason="client_cancelled")
        self._items.remove(item)
        self._emit("conversation.item.deleted", item_id=item_id)

    def _on_item_retrieve(self, event: Event) -> None:
        item_id: str = event["item_id"]
        item = self._find(item_id)
        if item is None:
            self._item_not_found(item_id, "retrieving", event)
            return
        self._emit("conversation.item.retrieved", item=item.public(with_audio=True))

    # ----------------------------------------------------------------- responses

    def _on_response_create(self, event: Event) -> None:
        self._start_response(event.get("response") or {}, event_id=event.get("event_id"))

    def _on_response_cancel(self, event: Event) -> None:
        wanted = event.get("response_id")
        response = self._responses.get(wanted) if wanted else self._active_default
        if response is None:
            self.error(
                "response_cancel_not_active",
                "Cancellation failed: no active response found",
                event_id=event.get("event_id"),
            )
            return
        self._finish(response, "cancelled", reason="client_cancelled")

    def _on_output_audio_buffer_clear(self, event: Event) -> None:
        self.error(
            "invalid_event",
            "'output_audio_buffer.clear' is only supported for WebRTC and SIP sessions.",
            param="type",
            event_id=event.get("event_id"),
        )

    def _start_response(self, params: dict[str, Any], *, event_id: str | None) -> None:
        in_conversation = params.get("conversation", "auto") != "none"
        if in_conversation and self._active_default is not None:
            self.error(
                "conversation_already_has_active_response",
                "Conversation already has an active response in progress: "
                f"{self._active_default.id}. Wait until the response is finished before creating a new one.",
                event_id=event_id,
            )
            return
        modalities = params.get("output_modalities") or self.config["output_modalities"]
        if len(set(modalities)) > 1:
            self.error(
                "invalid_value",
                "Invalid 'response.output_modalities': use either ['audio'] or ['text'], not both.",
                param="response.output_modalities",
                event_id=event_id,
            )
            return
        context = self._context(params)
        if context is None:
            self.error(
                "item_not_found",
                "Error creating response: an 'item_reference' in 'response.input' names no existing item.",
                param="response.input",
                event_id=event_id,
            )
            return
        session_output = self.config["audio"]["output"]
        override = (params.get("audio") or {}).get("output") or {}
        fmt = AudioFormat.from_json(override.get("format") or session_output["format"])
        instructions = params.get("instructions")
        if instructions is None:
            instructions = self.config["instructions"]
        turn = self._responses_created
        self._responses_created += 1
        heard = any(item.data.get("role") == "user" for item in context)
        words = script.words_of(script.coach_reply(instructions, turn, self.seed, heard_learner=heard))
        max_tokens = params.get("max_output_tokens", self.config["max_output_tokens"])
        audio_mode = "audio" in modalities
        speed = float(session_output.get("speed") or 1.0)
        voice_seed = self.seed * 1_000_003 + turn
        utterance = Utterance(words, seed=voice_seed, speed=speed)
        kept = usage.words_within(utterance.word_ends_ms, words, max_tokens, audio_mode)
        cut_short = kept < len(words)
        if cut_short:
            words = words[:kept]
            utterance = Utterance(words, seed=voice_seed, speed=speed)
        response_id = new_id("resp")
        item = assistant_item(new_id("item"), fmt if audio_mode else None)
        response = _Response(
            id=response_id,
            item=item,
            conversation_id=self._conversation_id if in_conversation else None,
            modalities=list(modalities),
            fmt=fmt,
            voice=override.get("voice") or session_output["voice"],
            max_output_tokens=max_tokens,
            metadata=params.get("metadata"),
            words=words,
            utterance=utterance,
            cut_short=cut_short,
            input_tokens=usage.context_tokens(instructions, context),
        )
        self._responses[response_id] = response
        if in_conversation:
            self._active_default = response
            self._idle_deadline_ms = None
        self._emit("response.created", response=self._response_json(response, "in_progress"))
        self._emit("response.output_item.added", response_id=response_id, output_index=0, item=item.public())
        if in_conversation:
            previous = self._items[-1].id if self._items else None
            self._items.append(item)
            self._emit("conversation.item.added", previous_item_id=previous, item=item.public())
        part = {"type": "audio", "transcript": ""} if audio_mode else {"type": "text", "text": ""}
        self._emit("response.content_part.added", **self._part_ids(response), part=part)
        self._actions.append(StreamResponse(response_id))

    def _context(self, params: dict[str, Any]) -> list[Item] | None:
        """The items a response reads: ``response.input`` when given, else the whole conversation."""
        given = params.get("input")
        if given is None:
            return list(self._items)
        context = []
        for entry in given:
            if entry.get("type") == "item_reference":
                found = self._find(entry["id"])
                if found is None:
                    return None
                context.append(found)
            else:
                context.append(Item(entry))
        return context

    def _response_json(self, response: _Response, status: str, **extra: Any) -> dict[str, Any]:
        return {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "status_details": extra.pop("status_details", None),
            "output": extra.pop("output", []),
            "conversation_id": response.conversation_id,
            "output_modalities": response.modalities,
            "max_output_tokens": response.max_output_tokens,
            "audio": {"output": {"format": response.fmt.as_json(), "voice": response.voice}},
            "usage": extra.pop("usage", None),
            "metadata": response.metadata,
        }

    @staticmethod
    def _part_ids(response: _Response) -> dict[str, Any]:
        return {
            "response_id": response.id,
            "item_id": response.item.id,
            "output_index": 0,
            "content_index": 0,
        }

    def advance_response(self, response_id: str) -> bool:
        """Emit the next chunk of a response (transcript delta, then audio delta); True once it is over.

        Returns True at once if the response was cancelled meanwhile.
        """
        response = self._responses.get(response_id)
        if response is None:
            return True
        utterance = response.utterance
        chunk_samples = SAMPLE_RATE * self.chunk_ms // 1000
        end = min(utterance.total_samples, response.position + chunk_samples)
        first = response.words_sent
        while response.words_sent < len(response.words) and utterance.word_starts[response.words_sent] < end:
            response.words_sent += 1
        if response.words_sent > first:
            delta = " ".join(response.words[first : response.words_sent])
            delta = delta if first == 0 else " " + delta
            response.text += delta
            if response.audio_mode:
                self._emit(
                    "response.output_audio_transcript.delta",
                    **self._part_ids(response),
                    delta=delta,
                    obfuscation=random_padding(max(1, 16 - len(delta) % 16)),
                )
            else:
                self._emit("response.output_text.delta", **self._part_ids(response), delta=delta)
        if response.audio_mode and end > response.position:
            audio = formats.encode_from_pcm24k(
                response.fmt, utterance.render(response.position, end - response.position)
            )
            assert response.item.audio is not None
            response.item.audio += audio
            if response.in_conversation:
                self._voice_locked = True
            self._emit(
                "response.output_audio.delta",
                **self._part_ids(response),
                delta=base64.b64encode(audio).decode("ascii"),
            )
        response.position = end
        if end >= utterance.total_samples and response.words_sent >= len(response.words):
            self._finish(response, "incomplete" if response.cut_short else "completed")
            return True
        return False

    def _finish(self, response: _Response, status: str, *, reason: str | None = None) -> None:
        """Emit the closing events of a response (REALTIME.md §3.4 steps 11-17) and forget it."""
        self._responses.pop(response.id, None)
        if self._active_default is response:
            self._active_default = None
        ids = self._part_ids(response)
        item = response.item
        if response.audio_mode:
            self._emit("response.output_audio.done", **ids)
            self._emit("response.output_audio_transcript.done", **ids, transcript=response.text)
            part: dict[str, Any] = {"type": "audio", "transcript": response.text}
            content: dict[str, Any] = {"type": "output_audio", "transcript": response.text}
        else:
            self._emit("response.output_text.done", **ids, text=response.text)
            part = {"type": "text", "text": response.text}
            content = {"type": "output_text", "text": response.text}
        self._emit("response.content_part.done", **ids, part=part)
        item.data["status"] = "completed" if status == "completed" else "incomplete"
        item.data["content"] = [content]
        self._emit("response.output_item.done", response_id=response.id, output_index=0, item=item.public())
        if response.in_conversation and item in self._items:
            index = self._items.index(item)
            previous = self._items[index - 1].id if index > 0 else None
            self._emit("conversation.item.done", previous_item_id=previous, item=item.public())
        if status == "cancelled":
            details: dict[str, Any] | None = {"type": "cancelled", "reason": reason}
        elif status == "incomplete":
            details = {"type": "incomplete", "reason": "max_output_tokens"}
        else:
            details = None
        spent = usage.response_usage(
            response.input_tokens, self._last_input_tokens, response.text, response.audio_ms
        )
        self._last_input_tokens = response.input_tokens  # the next response finds this prefix cached
        self._emit(
            "response.done",
            response=self._response_json(
                response, status, status_details=details, output=[item.public()], usage=spent
            ),
        )
        self._emit("rate_limits.updated", rate_limits=[self._rate_limits.record(spent["total_tokens"])])
        detection = self._turn_detection
        idle = detection.get("idle_timeout_ms") if detection is not None else None
        if response.in_conversation and idle:
            self._idle_deadline_ms = self._input_ms + response.audio_ms + idle
        self._limit_retained_audio()

    def _limit_retained_audio(self) -> None:
        """Drop the bytes of the oldest items' audio beyond :data:`AUDIO_RETENTION_MS` in total."""
        kept = 0.0
        streaming = {id(response.item) for response in self._responses.values()}
        for item in reversed(self._items):
            if item.audio is None or id(item) in streaming:
                continue
            kept += item.audio_ms
            if kept > AUDIO_RETENTION_MS:
                item.evict_audio()

    # ----------------------------------------------------------------- transcription

    def transcribe(self, item_id: str) -> None:
        """Emit the simulated transcription of a committed user item (nothing if it was deleted)."""
        item = self._find(item_id)
        config = self.config["audio"]["input"]["transcription"]
        if item is None or config is None:
            return
        duration_ms = int(item.audio_ms)
        deltas = script.placeholder_transcript(duration_ms)
        for delta in deltas:
            self._emit(
                "conversation.item.input_audio_transcription.delta",
                item_id=item_id,
                content_index=0,
                delta=delta,
                obfuscation=random_padding(max(1, 16 - len(delta) % 16)),
            )
        transcript = "".join(deltas)
        for part in item.data["content"]:
            if part.get("type") == "input_audio":
                part["transcript"] = transcript
        spent = usage.transcription_usage(config.get("model"), duration_ms, transcript)
        self._emit(
            "conversation.item.input_audio_transcription.completed",
            item_id=item_id,
            content_index=0,
            transcript=transcript,
            usage=spent,
        )

    # ----------------------------------------------------------------- faults

    def expire(self, max_session_s: float) -> str:
        """Emit the ``session_expired`` error and return the close reason to use with code 1001."""
        message = session.expiry_message(max_session_s)
        self.error("session_expired", message)
        return message

    def inject_error(self, code: str) -> None:
        """Emit a server-side ``error`` event with ``code`` (a fault knob)."""
        self.error(
            code,
            "The server had an error while processing your request. Sorry about that! (simulated)",
            kind="server_error",
        )
