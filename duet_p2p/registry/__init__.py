"""The OpenGrid registry: signed listings of datasets and models held by standing hosts.

``sy.registry.search("admissions", registry_url=...)`` finds listings (a table; ``[i]`` is
a verified :class:`Listing` with ``connect()``, ``mock()``, ``request_session()``,
``review()``); ``sy.registry.get(listing_id)``; ``sy.registry.sessions()`` lists your
session requests. ``DUET_REGISTRY_URL`` names the default registry.

The names below load on first use, so reading listings (``duet_p2p.registry.listing``)
never imports the HTTP client, pandas or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_CLIENT = "duet_p2p.registry.client"
_RESULTS = "duet_p2p.registry.results"
_EXPORTS = {
    "DEFAULT_REGISTRY_ENV": _CLIENT,
    "RegistryClient": _CLIENT,
    "RegistryError": _CLIENT,
    "get": _CLIENT,
    "get_async": _CLIENT,
    "search": _CLIENT,
    "search_async": _CLIENT,
    "sessions": _CLIENT,
    "sessions_async": _CLIENT,
    "Listing": _RESULTS,
    "ReviewsList": _RESULTS,
    "SearchResults": _RESULTS,
    "Session": _RESULTS,
    "SessionsList": _RESULTS,
}
__all__ = [
    "DEFAULT_REGISTRY_ENV",
    "Listing",
    "RegistryClient",
    "RegistryError",
    "ReviewsList",
    "SearchResults",
    "Session",
    "SessionsList",
    "get",
    "get_async",
    "search",
    "search_async",
    "sessions",
    "sessions_async",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'duet_p2p.registry' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *globals()})


if TYPE_CHECKING:
    from duet_p2p.registry.client import (
        DEFAULT_REGISTRY_ENV,
        RegistryClient,
        RegistryError,
        get,
        get_async,
        search,
        search_async,
        sessions,
        sessions_async,
    )
    from duet_p2p.registry.results import (
        Listing,
        ReviewsList,
        SearchResults,
        Session,
        SessionsList,
    )
