"""What a host says of a hosted object when it lists it on a registry.

:func:`find_hosted` finds the hosted object the owner names (the object itself, the
``HostedObject`` that ``host.send`` returned, or its tag). :func:`listing_fields` turns it,
the owner's words (name, summary, license...) and the host's settings into the fields of a
:class:`~duet_p2p.registry.listing.ListingSpec`: a schema inferred from the value (a
tensor's dtype and shape, a table's columns, a model's architecture), its approximate
size, the access modes the host offers, where to signal it, and a short honest summary of
what the host decides without its owner (:func:`policy_summary`). Nothing of the data
itself goes into a listing: names, dtypes, shapes and counts only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from duet_p2p.errors import DuetError
from duet_p2p.host.publish_sample import (
    UncheckedSample,
    copied_record,
    is_dataframe,
    sample_values,
)
from duet_p2p.registry.listing import (
    MAX_METRICS,
    MAX_POLICY_CHARS,
    MAX_SCHEMA_ENTRIES,
    MODALITIES,
    TENSOR_DTYPES,
)
from duet_p2p.registry.sample import check_sample
from duet_p2p.store import StoredObject

if TYPE_CHECKING:
    from duet_p2p.connect import ConnectOptions
    from duet_p2p.host.admissions import AdmissionPolicy
    from duet_p2p.owner.owner import Owner

__all__ = [
    "Description", "PublishError", "PublishingHost", "describe", "find_hosted", "frame_schema",
    "listing_fields", "metric_entries", "policy_summary", "tensor_dtype",
]  # fmt: skip

MAX_ARCHITECTURE_SECTIONS = 20_000
"""Values walked when a module spec becomes an architecture (the listing caps it again)."""
_LEADS = {"ask": "The owner admits each new scientist before they connect.",
          "any": "Any scientist may connect.",
          "list": "Only scientists the owner has listed may connect."}  # fmt: skip


class PublishError(DuetError, ValueError):
    """The object cannot be listed as asked (not hosted, ambiguous, not describable)."""


class PublishingHost(Protocol):
    """What a listing's fields are made from (a ``Host``; this module sits below it). Its
    ``_jobs``, when present, adds the job policy."""

    id: str
    options: ConnectOptions
    owner: Owner
    admission: AdmissionPolicy


# -- which hosted object -------------------------------------------------------------------


def find_hosted(host: PublishingHost, obj_or_tag: Any) -> StoredObject:
    """The record of the hosted object ``obj_or_tag`` names: a tag (its name or another of
    its tags), what ``host.send`` returned, the tensor or module itself, or the DataFrame
    that was sent (matched by its columns and rows). PublishError if none, or several."""
    records = host.owner.store.owner_records()
    if isinstance(obj_or_tag, str):
        named = [r for r in records if r.tags and r.tags[0] == obj_or_tag]
        found = named or [r for r in records if obj_or_tag in r.tags]
        what = f"tagged {obj_or_tag[:100]!r}"
    elif _is_hosted_receipt(obj_or_tag):
        found = [r for r in records if r.id == obj_or_tag.id]
        what = f"with ID {obj_or_tag.id}"
    elif is_dataframe(obj_or_tag):
        columns = tuple(str(c) for c in obj_or_tag.columns)
        found = [
            r for r in records
            if r.schema is not None and r.schema.columns == columns
            and isinstance(r.value, torch.Tensor) and r.value.shape[0] == len(obj_or_tag)
        ]  # fmt: skip
        what = "with this DataFrame's columns and rows"
    else:
        found = [r for r in records if r.value is obj_or_tag]
        what = "that is this object"
    if not found:
        raise PublishError(
            f"this host hosts nothing {what}: host it first (host.send(obj, tags=[...])), "
            "then publish it or its tag"
        )
    if len(found) > 1:
        tags = ", ".join(repr(r.tags[0]) if r.tags else r.id for r in found[:10])
        raise PublishError(f"several hosted objects are {what} ({tags}): publish one by its name")
    record = found[0]
    if not record.tags:
        raise PublishError("a published object needs a name: host it with tags=[name, ...]")
    return record


def _is_hosted_receipt(value: Any) -> bool:
    from duet_p2p.owner.store_view import HostedObject

    return isinstance(value, HostedObject)


# -- schema, size, architecture --------------------------------------------------------------


@dataclass(frozen=True)
class Description:
    """What the value itself tells: kind, modality, schema, size and architecture."""

    kind: str
    modality: str
    schema: list[dict[str, Any]]
    approx_size: dict[str, int]
    architecture: dict[str, Any] | None = None


def tensor_dtype(dtype: torch.dtype) -> str:
    """A tensor dtype's name in a listing (``torch.float32`` -> ``"float32"``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in TENSOR_DTYPES:
        raise PublishError(
            f"a listing cannot describe dtype {name} (known: {', '.join(sorted(TENSOR_DTYPES))}); "
            "pass schema= yourself"
        )
    return name


def frame_schema(frame: Any) -> list[dict[str, Any]]:
    """One schema entry per column of a pandas DataFrame, its dtype in the listing's words:
    bool, int8..int64, uint8, float16..float64, category, datetime or string."""
    import pandas as pd

    entries = []
    for column in frame.columns:
        dtype = frame[column].dtype
        entries.append({"name": str(column), "dtype": _column_dtype(pd, dtype)})
    return entries


def _column_dtype(pd: Any, dtype: Any) -> str:
    types = pd.api.types
    if isinstance(dtype, pd.CategoricalDtype):
        return "category"
    if types.is_bool_dtype(dtype):
        return "bool"
    if types.is_datetime64_any_dtype(dtype):
        return "datetime"
    if types.is_integer_dtype(dtype):
        name = str(dtype).lower()
        return name if name in TENSOR_DTYPES else "int64"
    if types.is_float_dtype(dtype):
        name = str(dtype).lower()
        return name if name in TENSOR_DTYPES else "float64"
    return "string"


def _table_schema(record: StoredObject) -> list[dict[str, Any]]:
    """A hosted 2-D tensor with named columns (a DataFrame sent to the host becomes one)."""
    schema, value = record.schema, record.value
    assert schema is not None
    dtype = tensor_dtype(value.dtype)
    return [
        {"name": name, "dtype": "category" if name in schema.categories else dtype}
        for name in schema.columns
    ]


def _module_architecture(module: torch.nn.Module) -> dict[str, Any]:
    """The module's declarative spec (duet_p2p.modules) with each tensor replaced by its
    dtype and shape: the model's structure, none of its weights."""
    from duet_p2p.modules import module_to_spec, parameter_count_of_spec

    spec = module_to_spec(module)
    budget = [MAX_ARCHITECTURE_SECTIONS]
    described = _plain(spec, budget)
    assert isinstance(described, dict)
    return {**described, "parameters": parameter_count_of_spec(spec)}


def _plain(value: Any, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise PublishError("the model is too large to describe: pass architecture= yourself")
    if isinstance(value, torch.Tensor):
        return {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
    if isinstance(value, Mapping):
        return {str(key): _plain(item, budget) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item, budget) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def describe(record: StoredObject, value: Any = None) -> Description:
    """What ``record`` (or ``value``, the DataFrame it was made from) shows of itself."""
    tag = record.tags[0]
    if is_dataframe(value):
        size = {"rows": len(value), "bytes": int(value.memory_usage(deep=True).sum())}
        return Description("dataset", "tabular", frame_schema(value), size)
    held = record.value
    if isinstance(held, torch.nn.Module):
        nbytes = sum(t.numel() * t.element_size() for t in held.state_dict().values())
        return Description("model", "other", [], {"bytes": int(nbytes)},
                           _module_architecture(held))  # fmt: skip
    if not isinstance(held, torch.Tensor):
        raise PublishError(f"cannot describe a hosted {type(held).__name__}")
    size = {"bytes": int(held.numel() * held.element_size())}
    if held.dim() >= 1:
        size["rows"] = int(held.shape[0])
    if record.schema is not None:
        return Description("dataset", "tabular", _table_schema(record), size)
    entry = {"name": tag, "dtype": tensor_dtype(held.dtype), "shape": list(held.shape)}
    if record.description:
        entry["description"] = _one_line(record.description, 500)
    return Description("dataset", "other", [entry], size)


def _one_line(text: str, limit: int) -> str:
    from duet_p2p.text import printable

    return printable(text, limit)


# -- the policy summary ------------------------------------------------------------------------


def policy_summary(host: PublishingHost, record: StoredObject) -> str:
    """What the host decides without its owner, for this object: admission, the handlers
    that apply to it, the minimum aggregation, its privacy budgets, and how offline jobs
    are reviewed. Plain text, a few short lines, at most MAX_POLICY_CHARS characters."""
    tags = frozenset(record.tags)
    lines = [_LEADS.get(host.admission.mode, _LEADS["ask"])]
    rules = [h for h in host.owner.requests.handlers if h.tags is None or h.tags <= tags]
    auto = [_handler_text(h) for h in rules]
    if auto:
        lines.append("Results: " + "; ".join(auto) + ". Anything else waits for the owner.")
    else:
        lines.append("Results: the owner reviews every request to take a value away.")
    least = getattr(host.owner.requests, "min_aggregation", 1)
    if auto and isinstance(least, int | float) and least > 1:
        lines.append(f"Rules release only values that summarise at least {least:g} records.")
    budgets = _budget_texts(host, tags)
    if budgets:
        lines.append("Differential privacy budgets: " + "; ".join(budgets) + ".")
    jobs = getattr(host, "_jobs", None)
    if jobs is not None:
        lines.append(_jobs_text(jobs.settings.policy, tags))
    text = "\n".join(lines)
    return text if len(text) <= MAX_POLICY_CHARS else text[: MAX_POLICY_CHARS - 1] + "…"


def _handler_text(handler: Any) -> str:
    what = f"{handler.op!r} results" if handler.op else "results"
    if handler.max_elements is not None:
        what += f" of at most {handler.max_elements} element{'s' * (handler.max_elements != 1)}"
    if handler.max_epsilon is not None or handler.dp:
        what = "differentially private " + what
        if handler.max_epsilon is not None:
            what += f" (epsilon <= {handler.max_epsilon:g} each)"
    elif handler.dp is False:
        what = "exact " + what
    verb = "are refused" if handler.action == "deny" else "are released automatically"
    text = f"{what} {verb}"
    if handler.max_requests is not None:
        text += f" (up to {handler.max_requests} times)"
    if handler.timeout_secs:
        text += f" after the owner has had {handler.timeout_secs:g} s to decide"
    return text


def _budget_texts(host: PublishingHost, tags: frozenset[str]) -> list[str]:
    from duet_p2p.permissions.ledger import DEFAULT_SCOPE, TOTAL_SCOPE

    ledger = getattr(host.owner, "_ledger", None)
    if ledger is None:
        return []
    try:
        caps = ledger.caps()
    except Exception:  # noqa: BLE001 - the summary is a courtesy; the ledger still rules
        return []
    texts = []
    for cap in caps:
        if cap.dataset not in tags or cap.scope not in (DEFAULT_SCOPE, TOTAL_SCOPE):
            continue
        who = "each scientist" if cap.scope == DEFAULT_SCOPE else "all scientists together"
        amount = f"epsilon {float(cap.epsilon):g}"
        if cap.delta:
            amount += f", delta {float(cap.delta):g}"
        texts.append(f"{who} {amount} on {cap.dataset!r}")
    return texts[:10]


def _jobs_text(policy: Any, tags: frozenset[str]) -> str:
    code = []
    if policy.approve_clients:
        code.append(f"jobs of {len(policy.approve_clients)} named scientist(s)")
    if policy.approve_plans:
        code.append(f"{len(policy.approve_plans)} approved plan(s)")
    if policy.approve_ops is not None:
        code.append(f"jobs using only {len(policy.approve_ops)} listed op(s)")
    text = "Offline jobs are taken. The owner reviews each job's code"
    if code:
        text += " (run without review: " + ", ".join(code)
        if policy.max_seconds is not None:
            text += f", asking for at most {policy.max_seconds:g} s"
        text += ")"
    rules = [r for r in policy.release if r.tags is None or r.tags <= tags]
    if rules:
        released = []
        for rule in rules[:5]:
            names = ", ".join(sorted(rule.outputs)) if rule.outputs else "any output"
            limit = "" if rule.max_elements is None else f" of at most {rule.max_elements} elements"
            released.append(names + limit)
        text += " and outputs (released automatically: " + "; ".join(released) + ")."
    else:
        text += " and each output before it is released."
    return text


# -- the listing's fields ---------------------------------------------------------------------


def listing_fields(
    host: PublishingHost,
    record: StoredObject,
    value: Any = None,
    *,
    name: str,
    summary: str = "",
    description: str = "",
    license: str,
    keywords: Iterable[str] = (),
    modality: str | None = None,
    citation: str | None = None,
    creators: Iterable[str | Mapping[str, str]] = (),
    usage_conditions: str = "",
    availability: Sequence[Mapping[str, Any]] = (),
    kind: str | None = None,
    metrics: Iterable[Mapping[str, Any]] | Mapping[str, float] = (),
    architecture: Mapping[str, Any] | None = None,
    schema: Sequence[Mapping[str, Any]] | None = None,
    policy: str | None = None,
    sample: Any = None,
    sample_copies_data: bool = False,
) -> tuple[str, dict[str, Any]]:
    """(kind, the ListingSpec fields) for ``record`` as the owner describes it; the listing
    checks each field again when built. A ``sample`` that holds a record of the hosted
    data is refused unless ``sample_copies_data`` (the data is public)."""
    if host.options.signaling_url is None:
        raise PublishError("the host has no signaling URL, so scientists could not reach it")
    found = describe(record, value)
    kind = kind or found.kind
    if modality is not None and modality not in MODALITIES:
        raise PublishError(f"modality is one of {', '.join(MODALITIES)}")
    entries = [dict(e) for e in schema] if schema is not None else found.schema
    if len(entries) > MAX_SCHEMA_ENTRIES:
        raise PublishError(f"a listing describes at most {MAX_SCHEMA_ENTRIES} columns or tensors: "
                           "pass schema= with the ones that matter")  # fmt: skip
    chosen = modality or found.modality
    if chosen == "tabular" and any("shape" in e for e in entries):
        raise PublishError("a tabular listing describes columns: host the data with columns=, "
                           "or pass schema= or another modality")  # fmt: skip
    access = ["live"] + (["offline_jobs"] if getattr(host, "_jobs", None) is not None else [])
    fields: dict[str, Any] = {
        "name": name, "summary": summary, "description": description, "license": license,
        "citation": citation, "creators": _creators(creators), "keywords": list(keywords),
        "modality": chosen, "schema": entries, "approx_size": found.approx_size,
        "usage_conditions": usage_conditions, "access_modes": access,
        "policy_summary": policy_summary(host, record) if policy is None else policy,
        "availability": [dict(w) for w in availability],
        "signaling_url": host.options.signaling_url,
        "architecture": None, "metrics": [], "tag": record.tags[0],
        "sample": _sample(sample, entries, record, sample_copies_data),
    }  # fmt: skip
    if kind == "model":
        given = dict(architecture) if architecture is not None else None
        fields["architecture"] = given if given is not None else found.architecture
        fields["metrics"] = metric_entries(metrics, host.id)
    elif architecture is not None or metrics:
        raise PublishError("only a model listing (kind='model') has an architecture and metrics")
    return kind, fields


def _sample(
    sample: Any, entries: list[dict[str, Any]], record: StoredObject, copies_data: bool
) -> dict[str, Any]:
    """The owner's sample as a listing holds it, refused if it copies a hosted record."""
    try:
        values = check_sample(sample_values(sample, entries), entries)
    except (TypeError, ValueError, OverflowError) as exc:
        raise PublishError(f"the sample does not fit the listing: {exc}") from None
    try:
        copied = None if copies_data else copied_record(values, entries, record)
    except UncheckedSample as exc:
        raise PublishError(
            f"the sample cannot be checked against the hosted data ({exc}), and a sample is "
            "published to everyone: describe the data as hosted, or pass "
            "sample_copies_data=True to publish the sample unchecked"
        ) from None
    if copied is not None:
        raise PublishError(
            f"record {copied} of the sample is a record of the hosted data, and a sample is "
            "published to everyone: make the sample synthetic (listing.mock() makes one from "
            "the schema), or pass sample_copies_data=True if this data is public"
        )
    return values


def _creators(creators: Iterable[str | Mapping[str, str]]) -> list[dict[str, str]]:
    if isinstance(creators, str | Mapping):
        creators = [creators]
    return [{"name": c} if isinstance(c, str) else dict(c) for c in creators]


def metric_entries(
    metrics: Iterable[Mapping[str, Any]] | Mapping[str, float], host_id: str
) -> list[dict[str, Any]]:
    """Metrics as a listing holds them. ``{"accuracy": 0.98}`` is self-reported; an entry
    ``{"name", "value", "dataset"?: listing_id, "receipt"?: Receipt or its wire bytes}``
    with a receipt says a job on this host produced it: the receipt must be this host's
    and its signature must hold (duet_p2p.offline.receipt), else PublishError."""
    if isinstance(metrics, Mapping):
        metrics = [{"name": str(k), "value": v} for k, v in metrics.items()]
    out: list[dict[str, Any]] = []
    for metric in metrics:
        if len(out) >= MAX_METRICS:
            raise PublishError(f"a listing holds at most {MAX_METRICS} metrics")
        if not isinstance(metric, Mapping):
            raise PublishError("a metric is {'name': ..., 'value': ...} (a dataset, a receipt)")
        entry = dict(metric)
        value = entry.get("value")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            entry["value"] = float(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            entry["value"] = float(value)
        if "receipt" in entry:
            entry["receipt"] = _receipt_bytes(entry["receipt"], host_id)
        out.append(entry)
    return out


def _receipt_bytes(receipt: Any, host_id: str) -> bytes:
    from duet_p2p.offline.receipt import InvalidReceipt, Receipt

    wire = receipt.to_wire() if isinstance(receipt, Receipt) else receipt
    if not isinstance(wire, bytes | bytearray):
        raise PublishError("a metric's receipt is a Receipt (job.receipt) or its wire bytes")
    try:
        Receipt.from_wire(bytes(wire)).verify(host_id)
    except InvalidReceipt as exc:
        raise PublishError(f"a metric's receipt is not one of this host's: {exc}") from None
    return bytes(wire)
