"""``duet.torch``: torch functions and constructors that run in the owner's process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from duet_p2p.errors import OperationNotAllowed

if TYPE_CHECKING:
    from duet_p2p.scientist.pointer import Pointer
    from duet_p2p.scientist.protocol import SessionCore


class RemoteNamespace:
    """A dotted path under ``torch``; calling it runs that function on the owner's side."""

    def __init__(self, core: SessionCore, path: str = "torch") -> None:
        self._core = core
        self._path = path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name == "no_grad" and self._path == "torch":
            return self._core.no_grad  # ``with duet.torch.no_grad():`` marks the ops inside
        return RemoteNamespace(self._core, f"{self._path}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Pointer:
        if self._core.allowed(self._path) is None:
            raise OperationNotAllowed(f"{self._path} is not on the owner's allowlist")
        return self._core.run(self._path, target=None, args=args, kwargs=kwargs)

    def __dir__(self) -> list[str]:
        prefix = self._path + "."
        names = {p[len(prefix) :].split(".")[0] for p in self._core.allowed_paths(prefix)}
        return sorted(names)

    def __repr__(self) -> str:
        return f"<remote {self._path}>"
