"""duet signaling server: relays WebRTC offers and answers by Duet ID, and nothing else."""

from signaling_server.app import RunningServer, create_app, start_server
from signaling_server.config import ServerConfig

__all__ = ["RunningServer", "ServerConfig", "create_app", "start_server"]
