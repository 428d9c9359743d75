"""The offer gate: real aiortc offers pass, everything the relay will not answer is invalid_sdp."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from relay.browser.sdp import MAX_OFFER_BYTES, InvalidOffer, validate_offer
from relay.errors import BadRequest
from tests.fakes.rtc_client import RtcClient

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
FP = ":".join(["AB"] * 32)

SESSION = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
AUDIO = (
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\n"
    "c=IN IP4 0.0.0.0\r\n"
    "a=mid:0\r\n"
    "a=sendrecv\r\n"
    "a=rtcp-mux\r\n"
    "a=rtpmap:111 opus/48000/2\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=ice-ufrag:abcd\r\n"
    "a=ice-pwd:abcdefghijklmnopqrstuv\r\n"
    f"a=fingerprint:sha-256 {FP}\r\n"
    "a=setup:actpass\r\n"
    "a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host\r\n"
    "a=candidate:2 1 udp 2130706431 10.1.2.3 50001 typ host\r\n"
    "a=candidate:3 1 udp 2130706431 0b1c2d3e-aaaa-bbbb-cccc-0123456789ab.local 50002 typ host\r\n"
    "a=candidate:4 1 udp 1694498815 203.0.113.9 50003 typ srflx raddr 10.1.2.3 rport 50001\r\n"
    "a=end-of-candidates\r\n"
)
APP = (
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
    "c=IN IP4 0.0.0.0\r\n"
    "a=mid:1\r\n"
    "a=sctp-port:5000\r\n"
    "a=ice-ufrag:abcd\r\n"
    "a=ice-pwd:abcdefghijklmnopqrstuv\r\n"
    f"a=fingerprint:sha-256 {FP}\r\n"
    "a=setup:actpass\r\n"
)
VIDEO = AUDIO.replace("m=audio 9 UDP/TLS/RTP/SAVPF 111 0", "m=video 9 UDP/TLS/RTP/SAVPF 96").replace(
    "a=rtpmap:111 opus/48000/2\r\na=rtpmap:0 PCMU/8000", "a=rtpmap:96 VP8/90000"
)
GOOD = SESSION + AUDIO + APP


def candidate_addresses(sdp: str) -> list[str]:
    return [line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")]


def invalid(raw: bytes | str) -> str:
    data = raw.encode() if isinstance(raw, str) else raw
    with pytest.raises(InvalidOffer) as caught:
        validate_offer(data, remote_allow=None)
    return caught.value.detail


async def test_real_aiortc_offer_with_data_channel_passes(loopback_ice: None) -> None:
    """An aiortc client's audio + data channel offer is accepted and keeps its loopback candidates."""
    async with RtcClient() as client:
        offer = await client.offer()
    cleaned = validate_offer(offer.encode(), remote_allow=LOOPBACK)
    assert cleaned.startswith("v=0\r\n") and cleaned.endswith("\r\n")
    assert candidate_addresses(cleaned) == candidate_addresses(offer) != []
    assert "m=application" in cleaned


async def test_real_aiortc_audio_only_offer_passes(loopback_ice: None) -> None:
    """An offer with audio and no data channel section is still acceptable (events are then dropped)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
    finally:
        await pc.close()
    assert "m=application" not in validate_offer(offer.encode(), remote_allow=LOOPBACK)


def test_hand_made_offer_passes_and_keeps_structure() -> None:
    """A minimal browser-like offer is accepted unchanged when every address is allowed."""
    assert validate_offer(GOOD.encode(), remote_allow=None) == GOOD


def test_invalid_offer_is_a_bad_request_with_code_invalid_sdp() -> None:
    """InvalidOffer maps to the API's 400 invalid_sdp."""
    err = InvalidOffer("x")
    assert isinstance(err, BadRequest) and err.code == "invalid_sdp"


@pytest.mark.parametrize(
    ("name", "mutate"),
    [
        ("not sdp", lambda s: "hello world"),
        ("empty", lambda s: ""),
        ("json", lambda s: '{"sdp": "v=0"}'),
        ("v=1", lambda s: s.replace("v=0", "v=1", 1)),
        ("junk line", lambda s: s.replace("s=-\r\n", "s=-\r\nthis is not sdp\r\n")),
        ("no audio", lambda s: SESSION + APP),
        ("video only", lambda s: SESSION + VIDEO),
        ("audio + video", lambda s: SESSION + AUDIO + VIDEO.replace("a=mid:0", "a=mid:2")),
        ("two audio", lambda s: SESSION + AUDIO + AUDIO.replace("a=mid:0", "a=mid:2") + APP),
        ("two data channels", lambda s: SESSION + AUDIO + APP + APP.replace("a=mid:1", "a=mid:2")),
        ("no opus", lambda s: s.replace("a=rtpmap:111 opus/48000/2\r\n", "")),
        ("opus mono rtpmap", lambda s: s.replace("opus/48000/2", "opus/48000")),
        ("opus pt not in m-line", lambda s: s.replace("111 0\r\n", "0\r\n", 1)),
        ("no fingerprint", lambda s: s.replace(f"a=fingerprint:sha-256 {FP}\r\n", "")),
        ("sha-1 fingerprint only", lambda s: s.replace("sha-256", "sha-1")),
        ("fingerprint with 3 fields", lambda s: s.replace(f"sha-256 {FP}", f"sha-256 {FP} x")),
        ("no ice-ufrag", lambda s: s.replace("a=ice-ufrag:abcd\r\n", "")),
        ("no ice-pwd", lambda s: s.replace("a=ice-pwd:abcdefghijklmnopqrstuv\r\n", "")),
        ("no setup", lambda s: s.replace("a=setup:actpass\r\n", "")),
        ("recvonly audio", lambda s: s.replace("a=sendrecv", "a=recvonly")),
        ("inactive audio", lambda s: s.replace("a=sendrecv", "a=inactive")),
        ("no rtcp-mux", lambda s: s.replace("a=rtcp-mux\r\n", "")),
        ("plain RTP profile", lambda s: s.replace("UDP/TLS/RTP/SAVPF", "RTP/AVP")),
        ("legacy sctp", lambda s: s.replace("UDP/DTLS/SCTP webrtc-datachannel", "DTLS/SCTP 5000")),
        ("text section", lambda s: s + "m=text 9 RTP/AVP 98\r\n"),
        ("malformed m-line", lambda s: s.replace("m=audio 9 UDP", "m=audio nine UDP")),
        ("forbidden payload type", lambda s: s.replace("111 0\r\n", "111 72\r\n", 1)),
        ("NUL byte", lambda s: s.replace("s=-", "s=\x00")),
    ],
)
def test_unacceptable_offers_are_invalid(name: str, mutate: Callable[[str], str]) -> None:
    """Each offer the relay must not answer raises InvalidOffer with a short, SDP-free reason."""
    offer = mutate(GOOD)
    reason = invalid(offer)
    assert len(reason) < 80
    assert "abcd" not in reason and "127.0.0.1" not in reason and "AB:AB" not in reason


def test_session_level_attributes_count_for_every_section() -> None:
    """Fingerprint, setup, ICE credentials and direction at session level are accepted."""
    hoisted = ["a=ice-ufrag:abcd", "a=ice-pwd:abcdefghijklmnopqrstuv", f"a=fingerprint:sha-256 {FP}"]
    media = (AUDIO + APP).replace("a=setup:actpass\r\n", "").replace("a=sendrecv\r\n", "")
    for line in hoisted:
        media = media.replace(line + "\r\n", "")
    offer = SESSION + "\r\n".join([*hoisted, "a=setup:actpass", "a=sendonly"]) + "\r\n" + media
    assert validate_offer(offer.encode(), remote_allow=None) == offer
    with pytest.raises(InvalidOffer):
        validate_offer(offer.replace("a=sendonly", "a=recvonly").encode(), remote_allow=None)


def test_size_limit_is_64_kib() -> None:
    """Offers over 64 KiB are refused before parsing; padding up to the limit is fine."""
    padding = "a=x-pad:" + "p" * 100 + "\r\n"
    body = GOOD + padding * ((MAX_OFFER_BYTES - len(GOOD)) // len(padding))
    assert len(body) <= MAX_OFFER_BYTES
    validate_offer(body.encode(), remote_allow=None)
    assert "64 KiB" in invalid(body + "a=x-pad:" + "p" * len(padding) + "\r\n")


def test_non_utf8_is_invalid() -> None:
    """Bytes that are not UTF-8 are refused."""
    assert "UTF-8" in invalid(GOOD.encode().replace(b"s=-", b"s=\xff\xfe"))


def test_candidates_outside_allow_list_and_mdns_are_removed() -> None:
    """With an allow list only loopback candidates stay; .local and other networks are gone."""
    cleaned = validate_offer(GOOD.encode(), remote_allow=LOOPBACK)
    assert candidate_addresses(cleaned) == ["127.0.0.1"]
    assert "a=end-of-candidates" in cleaned


def test_allow_list_accepts_listed_networks() -> None:
    """A candidate inside any listed network is kept, IPv4 or IPv6 lists alike."""
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("203.0.113.0/24")]
    assert candidate_addresses(validate_offer(GOOD.encode(), remote_allow=nets)) == [
        "10.1.2.3",
        "203.0.113.9",
    ]


def test_no_allow_list_keeps_every_wellformed_candidate() -> None:
    """remote_allow=None keeps all candidates, mDNS included."""
    assert len(candidate_addresses(validate_offer(GOOD.encode(), remote_allow=None))) == 4


def test_malformed_candidates_are_dropped_not_fatal() -> None:
    """A candidate line aiortc would choke on is removed and the offer still passes."""
    offer = GOOD.replace(
        "a=end-of-candidates",
        "a=candidate:9 1 udp notanumber 127.0.0.1 1 typ host\r\n"
        + "a=candidate:8 1 udp\r\na=end-of-candidates",
    )
    cleaned = validate_offer(offer.encode(), remote_allow=None)
    assert not re.search(r"candidate:[89] ", cleaned)


def test_unsupported_extra_fingerprint_is_tolerated() -> None:
    """A sha-1 fingerprint next to a sha-256 one passes: aiortc checks the supported one."""
    offer = GOOD.replace(
        f"a=fingerprint:sha-256 {FP}\r\n", f"a=fingerprint:sha-1 {FP[:59]}\r\na=fingerprint:sha-256 {FP}\r\n"
    )
    assert validate_offer(offer.encode(), remote_allow=None) == offer


def test_lf_line_endings_are_normalised_to_crlf() -> None:
    """An offer with bare LF line endings is accepted and returned with CRLF."""
    cleaned = validate_offer(GOOD.replace("\r\n", "\n").encode(), remote_allow=None)
    assert cleaned == GOOD
