"""Signaling: the WebSocket relay that lets peers of a run exchange WebRTC offers, answers and candidates."""
