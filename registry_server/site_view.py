"""What the registry website shows of a listing, computed from its signed document.

Pure functions, no I/O: the viewer's time zone, availability windows converted to it, a
small mock preview from the schema, pagination, and the listing's page model. Every value
here is still hostile text: templates escape it (autoescape); only the description is
marked safe: the HTML :func:`registry_server.render.render_markdown` made of it when the
listing was published (or, for a listing stored before that was kept, made here).
"""

from __future__ import annotations

import functools
import math
import re
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from markupsafe import Markup

from duet_p2p.registry.canonical_json import b64url_encode
from duet_p2p.registry.listing import DAYS, ListingSpec
from duet_p2p.registry.mock import mock_table, mock_tensors
from duet_p2p.registry.sample import nested_sizes, sample_rows
from registry_server.render import render_markdown

__all__ = [
    "DEFAULT_ZONE", "MAX_ZONE_CHARS", "PREVIEW_ROWS", "Slot", "availability_slots",
    "describe_window", "is_zone", "listing_model", "mock_preview", "page_numbers",
    "sample_preview", "when",
    "zone_names",
]  # fmt: skip

DEFAULT_ZONE = "UTC"
MAX_ZONE_CHARS = 64
PREVIEW_ROWS = 5
PREVIEW_VALUES = 6
"""First values shown of each mock tensor."""
SAMPLE_ROWS = 10
"""Rows of an owner's sample shown."""
MAX_PREVIEW_COLUMNS = 12
SLOT_DAYS = 7
_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,3}")
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@functools.cache
def zone_names() -> tuple[str, ...]:
    """Every IANA zone name this system knows, sorted."""
    return tuple(sorted(zoneinfo.available_timezones()))


def is_zone(value: object) -> bool:
    """True if ``value`` is a known IANA zone name."""
    return (
        type(value) is str
        and 0 < len(value) <= MAX_ZONE_CHARS
        and _ZONE.fullmatch(value) is not None
        and value in frozenset(zone_names())
    )


def when(at: float | None, zone: str) -> str:
    """A unix time as ``YYYY-MM-DD HH:MM`` in ``zone`` (``"never"`` for None)."""
    if at is None or not math.isfinite(at):
        return "never"
    try:
        moment = datetime.fromtimestamp(at, zoneinfo.ZoneInfo(zone))
    except (OverflowError, OSError, ValueError):
        return "unknown"
    return moment.strftime("%Y-%m-%d %H:%M")


@dataclass(frozen=True)
class Slot:
    """One upcoming availability window, in the viewer's zone and in the host's."""

    start: datetime
    end: datetime
    host_start: datetime
    host_end: datetime

    @property
    def text(self) -> str:
        return _span(self.start, self.end)

    @property
    def host_text(self) -> str:
        return _span(self.host_start, self.host_end)


def _span(start: datetime, end: datetime) -> str:
    head = f"{_DAY_NAMES[start.weekday()]} {start:%Y-%m-%d %H:%M}"
    tail = (
        f"{end:%H:%M}" if end.date() == start.date() else f"{_DAY_NAMES[end.weekday()]} {end:%H:%M}"
    )
    return f"{head}–{tail}"


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def describe_window(window: Mapping[str, Any]) -> str:
    """A window as its host wrote it: ``Mon, Tue 09:00–17:00 (Europe/Paris)``."""
    days = ", ".join(_DAY_NAMES[DAYS.index(day)] for day in window["days"])
    return f"{days} {window['start']}–{window['end']} ({window['tz']})"


def availability_slots(
    windows: Sequence[Mapping[str, Any]], viewer_zone: str, now: float
) -> list[Slot]:
    """The windows' occurrences over the next :data:`SLOT_DAYS` days (from today in each
    window's zone), shown in ``viewer_zone``, soonest first; finished ones left out.
    Conversion uses each date's own UTC offset, so daylight saving time is right."""
    viewer = zoneinfo.ZoneInfo(viewer_zone)
    found: list[Slot] = []
    for window in windows:
        host = zoneinfo.ZoneInfo(window["tz"])
        today = datetime.fromtimestamp(now, host).date()
        first, last = _minutes(window["start"]), _minutes(window["end"])
        for offset in range(SLOT_DAYS):
            day: date = today + timedelta(days=offset)
            if DAYS[day.weekday()] not in window["days"]:
                continue
            midnight = datetime(day.year, day.month, day.day, tzinfo=host)
            start = _local(midnight, first, host)
            end = _local(midnight, last, host)
            if end.timestamp() <= now:
                continue
            found.append(Slot(start.astimezone(viewer), end.astimezone(viewer), start, end))
    found.sort(key=lambda slot: slot.start.timestamp())
    return found


def _local(midnight: datetime, minutes: int, zone: zoneinfo.ZoneInfo) -> datetime:
    """Wall-clock ``minutes`` after ``midnight`` in ``zone`` (24:00 is next midnight)."""
    naive = midnight.replace(tzinfo=None) + timedelta(minutes=minutes)
    return naive.replace(tzinfo=zone).astimezone(UTC).astimezone(zone)


def _dims(shape: Sequence[int]) -> str:
    """A tensor shape for people: ``64 × ?`` (``?`` unknown), ``scalar`` for ``[]``."""
    return " × ".join("?" if size == -1 else str(size) for size in shape) or "scalar"


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join("?" if size == -1 else str(size) for size in shape) + "]"


def mock_preview(schema: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, Any]:
    """A small mock from the schema: ``{"columns", "rows", "tensors", "more_columns"}``.

    Columns: the first :data:`MAX_PREVIEW_COLUMNS`, :data:`PREVIEW_ROWS` rows. Tensors: the
    first :data:`PREVIEW_VALUES` values of each (a mock of that many values per tensor,
    same seed), with the shape and dtype the listing names. Nothing comes from real data.
    """
    columns = [
        {key: entry[key] for key in ("name", "dtype") if key in entry}
        for entry in schema
        if "shape" not in entry
    ]
    tensors = [entry for entry in schema if "shape" in entry]
    shown = columns[:MAX_PREVIEW_COLUMNS]
    rows: list[list[Any]] = []
    if shown:
        try:
            table = mock_table(shown, rows=PREVIEW_ROWS, seed=seed)
        except ValueError:
            table = {}
        if table:
            rows = [[table[c["name"]][i] for c in shown] for i in range(PREVIEW_ROWS)]
    previews = []
    if tensors:
        small = []
        for entry in tensors:
            count = math.prod(4 if size == -1 else size for size in entry["shape"])
            small.append({
                "name": entry["name"], "dtype": entry["dtype"],
                "shape": [min(count, PREVIEW_VALUES)],
            })  # fmt: skip
        try:
            arrays = mock_tensors(small, seed=seed, max_elements=PREVIEW_VALUES * len(small))
        except ValueError:
            arrays = {}
        for entry in tensors:
            values = arrays.get(entry["name"])
            shown_values = [] if values is None else [_number(v) for v in values.tolist()]
            previews.append({
                "name": entry["name"], "dtype": entry["dtype"],
                "shape": _shape_text(entry["shape"]), "first": shown_values,
            })  # fmt: skip
    return {
        "columns": [c["name"] for c in shown],
        "rows": rows,
        "more_columns": max(0, len(columns) - len(shown)),
        "more_rows": 0,
        "tensors": previews,
    }


def sample_preview(
    schema: Sequence[Mapping[str, Any]], sample: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The owner's sample as :func:`mock_preview` lays a mock out (its first
    :data:`SAMPLE_ROWS` rows; a missing value as an empty cell), plus ``records``; None
    when the listing has none."""
    if not sample:
        return None
    columns = [entry for entry in schema if "shape" not in entry]
    shown = columns[:MAX_PREVIEW_COLUMNS]
    records = sample_rows(sample, schema)
    rows = [
        ["" if sample[c["name"]][i] is None else _number(sample[c["name"]][i]) for c in shown]
        for i in range(min(records, SAMPLE_ROWS) if shown else 0)
    ]
    tensors = []
    for entry in schema:
        if "shape" in entry:
            flat = _first_values(sample[entry["name"]], PREVIEW_VALUES)
            tensors.append({
                "name": entry["name"], "dtype": entry["dtype"],
                "shape": _shape_text(nested_sizes(sample[entry["name"]])), "first": flat,
            })  # fmt: skip
    return {
        "columns": [c["name"] for c in shown],
        "rows": rows,
        "more_columns": max(0, len(columns) - len(shown)),
        "more_rows": max(0, records - SAMPLE_ROWS) if shown else 0,
        "tensors": tensors,
        "records": records,
    }


def _first_values(values: Any, count: int) -> list[str]:
    """The first ``count`` values of nested lists, in order, as text."""
    out: list[str] = []
    stack = [values]
    while stack and len(out) < count:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(_number(item))
    return out


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def page_numbers(page: int, pages: int, *, around: int = 2) -> list[int | None]:
    """Page numbers to link: the first, the last and those near ``page``; None is a gap."""
    wanted = {1, pages, *range(page - around, page + around + 1)}
    numbers = sorted(n for n in wanted if 1 <= n <= pages)
    out: list[int | None] = []
    for number in numbers:
        if out and out[-1] is not None and number - out[-1] > 1:  # type: ignore[operator]
            out.append(None)
        out.append(number)
    return out


def _size_text(size: Mapping[str, int]) -> str:
    parts = []
    if "rows" in size:
        parts.append(f"{size['rows']:,} rows")
    if "bytes" in size:
        amount, unit = float(size["bytes"]), "bytes"
        for name in ("KB", "MB", "GB", "TB", "PB"):
            if amount < 1000:
                break
            amount, unit = amount / 1000, name
        parts.append(f"{size['bytes']:,} bytes" if unit == "bytes" else f"≈ {amount:.1f} {unit}")
    return ", ".join(parts) or "not given"


def _architecture_summary(architecture: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """A few top-level facts of a module spec: its keys and short values (bounded)."""
    if not architecture:
        return []
    out = []
    for key, value in list(architecture.items())[:20]:
        if isinstance(value, (list, dict)):
            text = f"{type(value).__name__} of {len(value)}"
        else:
            text = str(value)
        out.append((str(key)[:100], text[:200]))
    return out


def listing_model(
    spec: ListingSpec, *, viewer_zone: str, now: float, description_html: str | None = None
) -> dict[str, Any]:
    """Everything the listing page shows, from a verified ``spec`` and its description as
    rendered at publish (``description_html``; None: render it now, a cost of up to half
    a second for a pathological text, so call this off the event loop)."""
    if description_html is None:
        description_html = render_markdown(spec.description)
    return {
        "spec": spec,
        "description_html": Markup(description_html),  # sanitized HTML
        "citation": spec.citation or "",
        "size": _size_text(spec.approx_size),
        "schema": [
            {
                "name": e["name"],
                "dtype": e["dtype"],
                "description": e.get("description", ""),
                "shape": _dims(e["shape"]) if "shape" in e else "column",
            }  # fmt: skip
            for e in spec.schema
        ],
        "preview": mock_preview(spec.schema),
        "sample": sample_preview(spec.schema, spec.sample),
        "windows": [describe_window(w) for w in spec.availability],
        "slots": availability_slots(spec.availability, viewer_zone, now),
        "architecture": _architecture_summary(spec.architecture),
        "metrics": [
            {
                "name": m["name"],
                "value": _number(m["value"]),
                "dataset": m.get("dataset"),
                "receipt": "receipt" in m,
            }  # fmt: skip
            for m in spec.metrics
        ],
        "hash": spec.hash(),
        "host_key": b64url_encode(spec.host_key),
        "created": when(spec.created_at, viewer_zone),
        "updated": when(spec.updated_at, viewer_zone),
    }
