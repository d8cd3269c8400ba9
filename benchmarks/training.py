"""Remote training steps per second against the same loop run locally, in the same run.

The model, data and loop are those of ``examples/train_digits``: an MLP (64-64-10) on the
digits training set, minibatches of 64 drawn from a shuffled order, Adam. Remotely every
step is 8 actions sent without waiting (index, two gathers, zero_grad, forward, loss,
backward, step); the clock stops when the last loss arrives. Locally the same code runs
on plain tensors in one process. Both sides use one torch thread (small ops: more threads
only add contention), so the ratio measures what the session costs per step.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks._peers import DuetPeer, Handlers, connect_duet, disconnect_duet, peers
from benchmarks._peers import signaling_server as start_signaling_server

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_digits"
STEPS = 400
WARMUP_STEPS = 30
BATCH = 64
ACTIONS_PER_STEP = 8
GOAL_RATIO = 0.5


def _example(name: str) -> ModuleType:
    """``examples/train_digits/<name>.py`` as a module (the examples are not a package)."""
    spec = importlib.util.spec_from_file_location(f"train_digits_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def training_steps(
    functional: Any, randperm: Any, model: Any, optimizer: Any, x: Any, y: Any,
    n: int, steps: int, batch: int = BATCH,
) -> Any:  # fmt: skip
    """``steps`` minibatch steps; the same code for local tensors (``torch``) and for
    pointers (``duet.torch``). Returns the last loss."""
    per_epoch = -(-n // batch)
    order, loss = None, None
    for step in range(steps):
        start = (step % per_epoch) * batch
        if start == 0:
            order = randperm(n)
        assert order is not None
        index = order[start : start + batch]
        optimizer.zero_grad()
        loss = functional.cross_entropy(model(x[index]), y[index])
        loss.backward()
        optimizer.step()
    return loss


class TrainingPeer(DuetPeer):
    """Owner: hosts the digits, accepts every request. Scientist: trains, remotely or not."""

    def __init__(self) -> None:
        super().__init__()
        self.model_ptr: Any = None
        self.optimizer_ptr: Any = None

    def handlers(self) -> Handlers:
        return {
            **super().handlers(),
            "host_digits": self.host_digits,
            "send_model": self.send_model,
            "train_remote": self.train_remote,
            "train_local": self.train_local,
        }

    def host_digits(self) -> int:
        """Owner: host the training split (private, shapes shown); returns its size."""
        import torch

        torch.set_num_threads(1)
        split = _example("owner").load_split()
        self.duet.send(split.x_train, tags=("x_train",), show_metadata=True)
        self.duet.send(split.y_train, tags=("y_train",), show_metadata=True)
        self.duet.requests.add_handler("accept")
        return len(split.y_train)

    def send_model(self) -> int:
        """Scientist: build the example's model here, send it, make its optimizer."""
        import torch

        torch.set_num_threads(1)
        torch.manual_seed(0)
        for tag in ("x_train", "y_train"):
            self.find(tag)
        self.model_ptr = _example("scientist").build_model().send(self.duet)
        self.optimizer_ptr = self.duet.torch.optim.Adam(self.model_ptr.parameters(), lr=1e-2)
        return self.duet.store.info("x_train")["shape"][0]

    def train_remote(self, steps: int, n: int) -> dict[str, float]:
        """Scientist: ``steps`` remote steps; seconds to issue them and until the last
        loss arrived."""
        torch_ns = self.duet.torch
        started = time.perf_counter()
        loss = training_steps(
            torch_ns.nn.functional, torch_ns.randperm, self.model_ptr, self.optimizer_ptr,
            self.objects["x_train"], self.objects["y_train"], n, steps,
        )  # fmt: skip
        issued = time.perf_counter() - started
        value = float(loss.get(reason="benchmark", timeout_secs=300))
        total = time.perf_counter() - started
        return {"issue_s": issued, "total_s": total, "last_loss": value}

    def train_local(self, steps: int) -> dict[str, float]:
        """Scientist: the same loop on a local copy of the data set, in this process."""
        import torch

        torch.set_num_threads(1)
        torch.manual_seed(0)
        split = _example("owner").load_split()
        model = _example("scientist").build_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        n = len(split.y_train)
        args = (torch.nn.functional, torch.randperm, model, optimizer, split.x_train)
        training_steps(*args, split.y_train, n, WARMUP_STEPS)
        started = time.perf_counter()
        loss = training_steps(*args, split.y_train, n, steps)
        value = float(loss.item())
        return {"total_s": time.perf_counter() - started, "last_loss": value}


def peer() -> Handlers:
    return TrainingPeer().handlers()


def run(steps: int = STEPS) -> dict[str, Any]:
    """Remote and local training steps per second, and their ratio (goal: >= 0.5)."""
    with (
        start_signaling_server() as url,
        peers(("benchmarks.training:peer", "owner"), ("benchmarks.training:peer", "scientist")) as (
            owner,
            scientist,
        ),
    ):
        connect_duet(owner, scientist, url)
        owner.call("host_digits")
        n = scientist.call("send_model")
        scientist.call("train_remote", steps=WARMUP_STEPS, n=n)  # imports, first graphs
        remote = scientist.call("train_remote", steps=steps, n=n, timeout=600)
        local = scientist.call("train_local", steps=steps, timeout=600)
        disconnect_duet(owner, scientist)
    remote_rate = steps / remote["total_s"]
    local_rate = steps / local["total_s"]
    ratio = remote_rate / local_rate
    return {
        "model": "MLP 64-64-10 on digits, batch 64, Adam, 1 torch thread per process",
        "steps": steps,
        "actions_per_step": ACTIONS_PER_STEP,
        "local_steps_per_s": local_rate,
        "remote_steps_per_s": remote_rate,
        "ratio_remote_to_local": ratio,
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio >= GOAL_RATIO,
        "remote_ms_per_step": 1000 * remote["total_s"] / steps,
        "local_ms_per_step": 1000 * local["total_s"] / steps,
        "issue_us_per_step": 1e6 * remote["issue_s"] / steps,
        "remote_last_loss": remote["last_loss"],
        "local_last_loss": local["last_loss"],
    }


run_benchmark = run


if __name__ == "__main__":
    import json

    results = run()
    print(json.dumps(results, indent=2))
    print(f"remote/local training steps per second: {results['ratio_remote_to_local']:.2f}x "
          f"(goal >= {GOAL_RATIO}x)")  # fmt: skip
