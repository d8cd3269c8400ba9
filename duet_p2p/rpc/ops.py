"""Op names both sides use that are not torch paths."""

INDEX_OP = "duet.index"
"""An item of a tuple, list or dict result (``ptr[0]`` on a remote tuple)."""
