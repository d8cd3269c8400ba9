"""What the registry's parts share on the aiohttp application: settings and stores.

Route modules (:mod:`registry_server.api`, :mod:`registry_server.api_inbox`,
:mod:`registry_server.site`) read these keys at request time; :mod:`registry_server.app`
fills them at startup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from registry_server.inbox_store import InboxStore
    from registry_server.store import RegistryStore

__all__ = ["DEFAULT_DATABASE", "INBOX", "PUBLIC_URL", "SETTINGS", "STORE", "RegistrySettings"]

DEFAULT_DATABASE = "sqlite:///registry.db"


@dataclass(frozen=True)
class RegistrySettings:
    """How a registry runs. ``public_url`` is the address clients use (signed access
    documents name it, so one registry's cannot be replayed at another); None means
    ``http://<host>:<port>`` as served (plus the mount prefix)."""

    database_url: str = DEFAULT_DATABASE
    public_url: str | None = None
    title: str = "OpenGrid Registry"
    max_body_bytes: int = (1 << 20) + 4096
    requests_per_second: float = 20.0
    burst: int = 60
    writes_per_minute: float = 30.0
    max_clients: int = 10_000
    page_size: int = 20
    exempt_networks: tuple[str, ...] = field(default_factory=tuple)


SETTINGS = web.AppKey("registry_settings", RegistrySettings)
STORE: web.AppKey[RegistryStore] = web.AppKey("registry_store")
INBOX: web.AppKey[InboxStore] = web.AppKey("registry_inbox")
PUBLIC_URL = web.AppKey("registry_public_url", str)
