"""A standing host: one owner serving many scientists over time."""
