"""Sans-I/O checks on the browser's SDP offer, before aiortc sees it.

aiortc's own parser asserts, raises ``KeyError``/``StopIteration`` on odd input and accepts any
number of media sections; this module is the gate in front of it. It answers one question, "is
this an offer we are willing to answer?", and removes ICE candidates the relay must not contact.
It never logs and never puts any part of the SDP into an error message.

What an acceptable offer looks like::

    v=0 ...                              UTF-8 text, at most 64 KiB
    m=audio ... UDP/TLS/RTP/SAVPF ...    exactly one; offers opus/48000/2; sendrecv or sendonly; rtcp-mux
    m=application ... UDP/DTLS/SCTP webrtc-datachannel     at most one
    a=fingerprint / a=setup / a=ice-ufrag / a=ice-pwd      for every section (session or media level)
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.errors import BadRequest

__all__ = ["MAX_OFFER_BYTES", "InvalidOffer", "validate_offer"]

MAX_OFFER_BYTES = 64 * 1024

_LINE = re.compile(r"[a-z]=[^\x00-\x08\x0a-\x1f\x7f]*")
# aiortc's own m-line grammar: a port with "/count" is not understood by it, so it is not accepted here.
_MLINE = re.compile(r"m=([a-z]+) ([0-9]{1,5}) ([A-Za-z/]+) (\S.*)")
_OPUS_RTPMAP = re.compile(r"([0-9]{1,3}) opus/48000/2", re.IGNORECASE)
_FINGERPRINT = re.compile(r"(sha-256|sha-384|sha-512) [0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){31,63}", re.IGNORECASE)
_DIRECTIONS = frozenset({"sendrecv", "sendonly", "recvonly", "inactive"})
_SETUP_VALUES = frozenset({"actpass", "active", "passive"})
# RTP payload types 72-76 collide with RTCP packet types; aiortc asserts on them.
_FORBIDDEN_PT = range(72, 77)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class InvalidOffer(BadRequest):
    """The offer is not one the relay will answer (API code ``invalid_sdp``, HTTP 400).

    ``detail`` is short and generic: it names the rule that failed, never the offending SDP.
    """

    code = "invalid_sdp"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, code="invalid_sdp")


@dataclass(slots=True)
class _Section:
    kind: str  # "session" or the m-line's media
    lines: list[str] = field(default_factory=list)
    proto: str = ""
    formats: list[str] = field(default_factory=list)

    def attrs(self, name: str) -> list[str]:
        """Values of ``a=name:value`` (or ``""`` for a flag ``a=name``), in order."""
        prefix = f"a={name}"
        out: list[str] = []
        for line in self.lines:
            if line == prefix:
                out.append("")
            elif line.startswith(prefix + ":"):
                out.append(line[len(prefix) + 1 :])
        return out

    def direction(self) -> str | None:
        found = [line[2:] for line in self.lines if line[2:] in _DIRECTIONS]
        return found[-1] if found else None


def validate_offer(raw: bytes, *, remote_allow: Sequence[Network] | None) -> str:
    """Check a browser's SDP offer and return it sanitised, or raise :class:`InvalidOffer`.

    Accepted: at most :data:`MAX_OFFER_BYTES` of UTF-8 text starting with ``v=0``; exactly one
    audio section offering ``opus/48000/2`` in a direction the browser sends in (``sendrecv`` or
    ``sendonly``) with ``rtcp-mux``; at most one ``UDP/DTLS/SCTP webrtc-datachannel`` section;
    nothing else. Every section needs a supported DTLS fingerprint, ``a=setup`` and ICE
    credentials, at session or media level.

    Sanitising: ``a=candidate`` lines that are malformed, or whose address is outside
    ``remote_allow``, are removed (``None`` allows every address). With an allow list, host-name
    candidates (mDNS ``.local``) are removed too, since their address cannot be checked before
    aiortc resolves and contacts it. Line endings become CRLF. Pure function; never logs.
    """
    if len(raw) > MAX_OFFER_BYTES:
        raise InvalidOffer("offer is larger than 64 KiB")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidOffer("offer is not UTF-8 text") from None
    lines = [line for line in re.split(r"\r?\n", text) if line]
    if not lines or lines[0] != "v=0":
        raise InvalidOffer("offer is not SDP (must start with v=0)")
    if not all(_LINE.fullmatch(line) for line in lines):
        raise InvalidOffer("offer is not SDP (malformed line)")

    session, media = _split(lines)
    audio = [m for m in media if m.kind == "audio"]
    application = [m for m in media if m.kind == "application"]
    if len(audio) + len(application) != len(media):
        raise InvalidOffer("offer may contain only audio and one data channel section")
    if len(audio) != 1:
        raise InvalidOffer("offer must contain exactly one audio section")
    if len(application) > 1:
        raise InvalidOffer("offer may contain at most one data channel section")

    _check_audio(audio[0], session)
    if application:
        _check_application(application[0])
    for section in media:
        _check_transport(section, session)

    kept = [line for line in lines if _keep_line(line, remote_allow)]
    return "\r\n".join(kept) + "\r\n"


def _split(lines: list[str]) -> tuple[_Section, list[_Section]]:
    session = _Section("session")
    media: list[_Section] = []
    current = session
    for line in lines:
        if line.startswith("m="):
            match = _MLINE.fullmatch(line)
            if match is None:
                raise InvalidOffer("offer has a malformed media line")
            current = _Section(match.group(1), proto=match.group(3), formats=match.group(4).split())
            media.append(current)
        current.lines.append(line)
    return session, media


def _check_audio(audio: _Section, session: _Section) -> None:
    if audio.proto not in ("UDP/TLS/RTP/SAVPF", "RTP/SAVPF"):
        raise InvalidOffer("audio section must use UDP/TLS/RTP/SAVPF")
    if not all(f.isdigit() and int(f) < 128 and int(f) not in _FORBIDDEN_PT for f in audio.formats):
        raise InvalidOffer("audio section has invalid payload types")
    opus = [m.group(1) for v in audio.attrs("rtpmap") if (m := _OPUS_RTPMAP.fullmatch(v))]
    if not any(pt in audio.formats for pt in opus):
        raise InvalidOffer("audio section does not offer Opus")
    direction = audio.direction() or session.direction() or "sendrecv"
    if direction not in ("sendrecv", "sendonly"):
        raise InvalidOffer("audio section must send (sendrecv or sendonly)")
    if not audio.attrs("rtcp-mux"):
        raise InvalidOffer("audio section must use rtcp-mux")


def _check_application(app: _Section) -> None:
    if app.proto != "UDP/DTLS/SCTP" or app.formats != ["webrtc-datachannel"]:
        raise InvalidOffer("data channel section must be UDP/DTLS/SCTP webrtc-datachannel")


def _check_transport(section: _Section, session: _Section) -> None:
    fingerprints = section.attrs("fingerprint") + session.attrs("fingerprint")
    # aiortc unpacks every fingerprint into exactly two fields and ignores unsupported algorithms.
    if not all(len(f.split()) == 2 for f in fingerprints) or not any(
        _FINGERPRINT.fullmatch(f) for f in fingerprints
    ):
        raise InvalidOffer("offer lacks a supported DTLS fingerprint")
    setup = section.attrs("setup") or session.attrs("setup")
    if not setup or setup[-1] not in _SETUP_VALUES:
        raise InvalidOffer("offer lacks a valid DTLS setup attribute")
    for name in ("ice-ufrag", "ice-pwd"):
        values = section.attrs(name) or session.attrs(name)
        if not values or not values[-1] or " " in values[-1]:
            raise InvalidOffer("offer lacks ICE credentials")


def _keep_line(line: str, remote_allow: Sequence[Network] | None) -> bool:
    if not line.startswith("a=candidate:"):
        return True
    bits = line[len("a=candidate:") :].split()
    # aiortc's candidate parser asserts on fewer fields and int()s these two.
    if len(bits) < 8 or bits[6] != "typ" or not bits[1].isdigit() or not bits[5].isdigit():
        return False
    if not bits[3].isdigit():
        return False
    if remote_allow is None:
        return True
    try:
        address = ipaddress.ip_address(bits[4])
    except ValueError:
        return False  # a host name (mDNS ".local" or other): cannot be checked before it is contacted
    return any(address in network for network in remote_allow)
