"""Every message kind on the wire: one pydantic model each, discriminated on ``kind``.

The models are the documentation of the protocol and its check at once: sizes and lengths
are field constraints, unknown fields are refused, and values that carry data (arguments,
results) are left to the codec, which already bounded them while decoding.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from duet_p2p.errors import ProtocolError
from duet_p2p.rpc.dp_spec import QuerySpec

PROTOCOL_VERSION = 5
"""2: gets carry max_bytes; failures of private results are released like values.
3: differentially private queries and budgets.
4: a scientist lists their requests and fetches values approved while away.
5: offline jobs on a standing host (submit, list, cancel, fetch results)."""
MAX_JOB_BYTES = (1 << 20) + 256
"""Largest signed job (``duet_p2p.offline.spec.MAX_WIRE_BYTES``)."""
ObjectId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9a-zA-Z_-]+$")]
OpPath = Annotated[str, Field(min_length=1, max_length=200)]
Text = Annotated[str, Field(max_length=4000)]
MAX_ACTIONS_PER_MESSAGE = 10_000
MAX_ARGS = 64


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Hello(Message):
    """First message each way: versions and limits."""

    kind: Literal["hello"] = "hello"
    version: int = Field(ge=0, le=1_000_000)
    role: Literal["owner", "scientist"]
    library: Annotated[str, Field(max_length=100)] = ""
    max_message_bytes: int = Field(ge=0)
    allowlist: dict[OpPath, Annotated[str, Field(max_length=20)]] | None = Field(
        default=None, max_length=100_000
    )
    """The owner's allowlist: op path -> return kind, so pointers refuse early."""


class Action(Message):
    """Run ``op`` owner-side; store the result (or the error) under ``result``."""

    op: OpPath
    result: ObjectId
    target: Any = None
    args: list[Any] = Field(default_factory=list, max_length=MAX_ARGS)
    kwargs: dict[Annotated[str, Field(max_length=64)], Any] = Field(
        default_factory=dict, max_length=MAX_ARGS
    )
    no_grad: bool = False
    """Run under ``torch.no_grad()``: no autograd graph (evaluation)."""


class Actions(Message):
    """A batch of actions, run in order. Fire-and-forget: no reply."""

    kind: Literal["actions"] = "actions"
    actions: list[Action] = Field(min_length=1, max_length=MAX_ACTIONS_PER_MESSAGE)


class Upload(Message):
    """The scientist places its own value (a tensor, a module spec) in the owner's process."""

    kind: Literal["upload"] = "upload"
    result: ObjectId
    value: Any
    as_module: bool = False


class Delete(Message):
    """The scientist dropped these pointers; free what the peer created."""

    kind: Literal["delete"] = "delete"
    ids: list[ObjectId] = Field(min_length=1, max_length=100_000)


class StoreQuery(Message):
    """List the owner's searchable objects."""

    kind: Literal["store_query"] = "store_query"
    call_id: int = Field(ge=0)


class GetRequest(Message):
    """Ask for the value behind ``object_id``; the owner replies with a RequestStatus."""

    kind: Literal["get"] = "get"
    call_id: int = Field(ge=0)
    object_id: ObjectId
    reason: Text = ""
    delete: bool = False
    max_bytes: int | None = Field(default=None, ge=0)
    """Largest encoded value the scientist will take; the owner denies a larger one up front."""


class CancelRequest(Message):
    """The scientist stopped waiting for a request (it timed out on its side)."""

    kind: Literal["cancel_request"] = "cancel_request"
    request_id: ObjectId


class Describe(Message):
    """Ask what is known of an object without its value: error state and public metadata."""

    kind: Literal["describe"] = "describe"
    call_id: int = Field(ge=0)
    object_id: ObjectId


class DPQuery(Message):
    """A differentially private statistic of a hosted dataset; answered like a get (a
    request ID and status, then a Decision carrying the noisy value)."""

    kind: Literal["dp_query"] = "dp_query"
    call_id: int = Field(ge=0)
    dataset: ObjectId
    query: QuerySpec
    reason: Text = ""


class BudgetQuery(Message):
    """What is left of the scientist's privacy budgets."""

    kind: Literal["dp_budget"] = "dp_budget"
    call_id: int = Field(ge=0)


class ListRequests(Message):
    """Scientist -> owner: the scientist's own requests, with their status."""

    kind: Literal["list_requests"] = "list_requests"
    call_id: int = Field(ge=0)


class FetchRelease(Message):
    """Scientist -> owner: send again the value of one of the scientist's own requests that
    was accepted while they were away (answered by a reply, then a decision)."""

    kind: Literal["fetch_release"] = "fetch_release"
    call_id: int = Field(ge=0)
    request_id: ObjectId


class SubmitJob(Message):
    """Scientist -> standing host: a signed offline job (``duet_p2p.offline.spec`` wire form);
    the reply is the job's row."""

    kind: Literal["submit_job"] = "submit_job"
    call_id: int = Field(ge=0)
    job: Annotated[bytes, Field(max_length=MAX_JOB_BYTES)]


class ListJobs(Message):
    """Scientist -> standing host: the scientist's own jobs, with their states."""

    kind: Literal["list_jobs"] = "list_jobs"
    call_id: int = Field(ge=0)


class CancelJob(Message):
    """Scientist -> standing host: cancel one of the scientist's jobs."""

    kind: Literal["cancel_job"] = "cancel_job"
    call_id: int = Field(ge=0)
    job_id: ObjectId


class FetchJobResult(Message):
    """Scientist -> standing host: the results of a released job; the reply is the job's
    row, then (when released) a JobResult carrying the result bundle."""

    kind: Literal["fetch_job_result"] = "fetch_job_result"
    call_id: int = Field(ge=0)
    job_id: ObjectId


class JobResult(Message):
    """Standing host -> scientist: a released job's result bundle (the attachment)."""

    kind: Literal["job_result"] = "job_result"
    job_id: ObjectId
    value: Any = None


class JobChanged(Message):
    """Standing host -> scientist: one of the scientist's jobs changed state (ask
    ``list_jobs`` for the rest)."""

    kind: Literal["job_changed"] = "job_changed"
    job_id: ObjectId
    state: Annotated[str, Field(max_length=32)]


class Reply(Message):
    """The answer to a message that had a ``call_id``."""

    kind: Literal["reply"] = "reply"
    call_id: int = Field(ge=0)
    ok: bool
    value: Any = None
    error: dict[str, Any] | None = None


class Decision(Message):
    """Owner -> scientist: a request was accepted (with the value) or denied."""

    kind: Literal["decision"] = "decision"
    request_id: ObjectId
    status: Literal["accepted", "denied", "expired"]
    reason: Text = ""
    value: Any = None
    module: bool = False
    """The value is a module spec, to be rebuilt as an ``nn.Module``."""
    error: dict[str, Any] | None = None


class StoreChanged(Message):
    """Owner -> scientist: the listing changed; refresh when next shown."""

    kind: Literal["store_changed"] = "store_changed"


class ErrorNotice(Message):
    """A message could not be accepted; sent back instead of crashing."""

    kind: Literal["error"] = "error"
    code: Annotated[str, Field(max_length=64)]
    message: Text
    call_id: int | None = None


AnyMessage = Annotated[
    Hello
    | Actions
    | Upload
    | Delete
    | StoreQuery
    | GetRequest
    | CancelRequest
    | Describe
    | DPQuery
    | BudgetQuery
    | ListRequests
    | FetchRelease
    | SubmitJob
    | ListJobs
    | CancelJob
    | FetchJobResult
    | JobResult
    | JobChanged
    | Reply
    | Decision
    | StoreChanged
    | ErrorNotice,
    Field(discriminator="kind"),
]
_adapter: TypeAdapter[Any] = TypeAdapter(AnyMessage)


def parse_message(data: object) -> Message:
    """Validate a decoded CBOR value as one of the message kinds."""
    if not isinstance(data, dict):
        raise ProtocolError("a message must be a map")
    try:
        return _adapter.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "message"
        raise ProtocolError(f"invalid message: {where}: {first.get('msg', 'invalid')}") from None


def to_wire(message: Message) -> dict[str, Any]:
    """A message as a plain map for the codec; values (tensors, references) stay as they are.

    (pydantic's ``model_dump`` would turn dataclass values such as ObjectRef into dicts.)
    """
    wire: dict[str, Any] = {}
    for name in type(message).model_fields:
        value = getattr(message, name)
        if isinstance(value, Message):
            value = to_wire(value)
        elif isinstance(value, BaseModel):
            value = value.model_dump(mode="python")
        elif isinstance(value, list) and value and isinstance(value[0], Message):
            value = [to_wire(item) for item in value]
        wire[name] = value
    return wire


def call_id_of(data: object) -> int | None:
    """The call id of a raw message, if it has a usable one (to address an error reply)."""
    if isinstance(data, dict):
        value = data.get("call_id")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
            return value
    return None
