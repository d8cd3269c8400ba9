"""Scientist-side pointers: proxies whose every operation runs in the owner's process.

An operation on a pointer is fire-and-forget: this side picks the result's ID, queues the
action and returns a new pointer at once, so chains cost no round trips. Only ``get()``
waits, for the owner's decision. A private pointer reveals nothing locally: no length, no
truth value, no iteration; its repr is a local description.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from duet_p2p.allowlist import OPERATOR_DUNDERS
from duet_p2p.errors import OperationNotAllowed, PrivateValueError
from duet_p2p.rpc.ops import INDEX_OP
from duet_p2p.text import printable

if TYPE_CHECKING:
    from duet_p2p.scientist.protocol import SessionCore
    from duet_p2p.scientist.requests import RequestHandle

TENSOR = "torch.Tensor"
MODULE = "torch.nn.Module"
OPTIMIZER = "torch.optim.Optimizer"
MAX_REPR_EXPRESSION_CHARS = 2000
_RECEIVER_OF_KIND = {"tensor": TENSOR, "auto": TENSOR, "module": MODULE, "optimizer": OPTIMIZER}


class Pointer:
    """A reference to an object in the owner's process."""

    _receiver: str | None = None

    def __init__(
        self, core: SessionCore, object_id: str, *, expression: str, kind: str, owned: bool
    ) -> None:
        self._core = core
        self.id = object_id
        self._expression = expression
        self._kind = kind
        self._owned = owned

    # -- getting the value -------------------------------------------------------------

    def get(
        self,
        reason: str = "",
        request_block: bool = True,
        timeout_secs: float | None = None,
        delete: bool = False,
        max_bytes: int | None = None,
    ) -> Any:
        """The value, once the owner (or an owner's policy) accepts; blocks by default.

        With ``request_block=False`` returns a RequestHandle at once (``.status``,
        ``.wait(timeout)``, ``.result()``). ``max_bytes`` bounds the encoded value (default:
        the session's ``max_get_bytes``, 2 GiB): the owner is asked to deny a larger one,
        and one sent anyway is dropped with ValueTooLarge. Raises PermissionDenied,
        RequestTimeout, or RemoteError when the owner released the error the computation
        failed with.
        """
        request = self._core.request(self.id, reason, delete=delete, max_bytes=max_bytes)
        handle = self._core.sync(request)
        if not request_block:
            return handle
        return handle.result(timeout=timeout_secs)

    async def get_async(
        self,
        reason: str = "",
        timeout_secs: float | None = None,
        delete: bool = False,
        max_bytes: int | None = None,
    ) -> Any:
        """``get`` for asyncio code."""
        handle = await self._core.request(self.id, reason, delete=delete, max_bytes=max_bytes)
        return await handle.result_async(timeout=timeout_secs)

    def request(
        self, reason: str = "", delete: bool = False, max_bytes: int | None = None
    ) -> RequestHandle:
        """Ask for the value without waiting: ``get(reason, request_block=False)``."""
        return self.get(reason, request_block=False, delete=delete, max_bytes=max_bytes)

    # -- running ops ---------------------------------------------------------------------

    def _run(self, op: str, *args: Any, **kwargs: Any) -> Pointer:
        return self._core.run(op, target=self, args=args, kwargs=kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or self._receiver is None:
            raise AttributeError(name)
        path = f"{self._receiver}.{name}"
        entry = self._core.allowed(path)
        if entry is None:
            raise OperationNotAllowed(
                f"{path} is not on the owner's allowlist, so it cannot run on {self._expression}"
            )
        if entry.attribute:
            return self._run(path)
        return _RemoteMethod(self, path)

    def __getitem__(self, index: Any) -> Pointer:
        if self._receiver == TENSOR:
            return self._run(f"{TENSOR}.__getitem__", index)
        return self._run(INDEX_OP, index)

    def __setitem__(self, index: Any, value: Any) -> None:
        self._run(f"{TENSOR}.__setitem__", index, value)

    # -- what a private pointer must not reveal -----------------------------------------

    def __len__(self) -> int:
        raise PrivateValueError(
            f"the length of {self._expression} lives on the owner's side; use "
            "ptr.size() or ptr.shape (pointers) and get() them with the owner's approval"
        )

    def __iter__(self) -> Any:
        raise PrivateValueError(
            f"cannot iterate over {self._expression} locally: index it (ptr[0]) instead"
        )

    def __bool__(self) -> bool:
        raise PrivateValueError(
            f"the truth value of {self._expression} lives on the owner's side; get() it first"
        )

    def __index__(self) -> int:
        raise PrivateValueError(f"{self._expression} is remote: get() it to use it as a number")

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        expression = printable(self._expression, MAX_REPR_EXPRESSION_CHARS)
        return f"<{type(self).__name__} {expression} id={printable(self.id[:8], 8)}>"

    def __str__(self) -> str:
        return repr(self)

    def __del__(self) -> None:
        if self._owned:
            try:
                self._core.release(self.id)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def __reduce__(self) -> Any:
        raise TypeError("pointers cannot be pickled")


class _RemoteMethod:
    """A bound remote method waiting for its arguments."""

    __slots__ = ("_pointer", "_path")

    def __init__(self, pointer: Pointer, path: str) -> None:
        self._pointer = pointer
        self._path = path

    def __call__(self, *args: Any, **kwargs: Any) -> Pointer:
        return self._pointer._run(self._path, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<remote method {self._path} of {self._pointer!r}>"


def _operator(name: str) -> Callable[..., Pointer]:
    path = f"{TENSOR}.{name}"

    def method(self: Pointer, *args: Any) -> Pointer:
        return self._run(path, *args)

    method.__name__ = name
    return method


class TensorPointer(Pointer):
    """Points to a tensor: torch.Tensor methods and Python operators run remotely."""

    _receiver = TENSOR


for _name in sorted(OPERATOR_DUNDERS - {"__getitem__", "__setitem__", "__len__"}):
    setattr(TensorPointer, _name, _operator(_name))


class ModulePointer(Pointer):
    """Points to an ``nn.Module``: call it, train it, get it back as a local module."""

    _receiver = MODULE

    def __call__(self, *args: Any, **kwargs: Any) -> Pointer:
        return self._run(f"{MODULE}.__call__", *args, **kwargs)


class OptimizerPointer(Pointer):
    """Points to an optimizer: ``step()`` and ``zero_grad()`` run remotely."""

    _receiver = OPTIMIZER


class ValuePointer(Pointer):
    """Points to a number, a bool, a size, a list or a tuple of tensors."""


def pointer_class(kind: str) -> type[Pointer]:
    """The pointer class for an allowlist return kind."""
    receiver = _RECEIVER_OF_KIND.get(kind)
    if receiver == TENSOR:
        return TensorPointer
    if receiver == MODULE:
        return ModulePointer
    if receiver == OPTIMIZER:
        return OptimizerPointer
    return ValuePointer
