"""Transports that drive a call: FastRTC (WebRTC and its websocket)."""
