"""Client of the duet signaling server."""

from duet_p2p.signaling.client import SignalingClient

__all__ = ["SignalingClient"]
