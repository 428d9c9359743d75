"""Edge 1: the learner's browser over WebRTC (aiortc), at the media layer.

``sdp`` (Sans-I/O offer gate) -> ``peer`` (one ``RTCPeerConnection`` per connection attempt) ->
``mic`` (browser -> relay audio) and ``speaker`` (relay -> browser audio); ``jitter`` patches
aiortc's receive path for latency, ``ice`` pins interfaces and STUN/TURN. Modules are imported
individually so the Sans-I/O parts do not pull in aiortc.
"""
