"""Where duet_p2p keeps a person's files: ``$DUET_HOME``, else the per-user data directory."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

HOME_ENV = "DUET_HOME"


def data_dir() -> Path:
    """The directory for files that outlive a session (created 0700 on first use)."""
    override = os.environ.get(HOME_ENV, "").strip()
    path = Path(override).expanduser() if override else Path(platformdirs.user_data_dir("duet_p2p"))
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path
