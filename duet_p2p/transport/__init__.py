"""Moving bytes between two peers: framing, flow control, heartbeat, graceful close."""

from duet_p2p.transport.base import MessageTransport
from duet_p2p.transport.channel import ChannelOptions, DataChannelTransport
from duet_p2p.transport.memory import memory_pair

__all__ = ["ChannelOptions", "DataChannelTransport", "MessageTransport", "memory_pair"]
