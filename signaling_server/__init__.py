"""duet signaling server: relays WebRTC offers and answers by ID, lets standing hosts wait
for scientists, and holds end-to-end encrypted mailbox messages it cannot read."""

from signaling_server.app import RunningServer, create_app, start_server
from signaling_server.config import ServerConfig

__all__ = ["RunningServer", "ServerConfig", "create_app", "start_server"]
