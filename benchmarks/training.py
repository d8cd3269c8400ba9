"""Remote training steps per second against the same loop run locally, in the same run.

The model, data and loop are those of ``examples/train_digits``: an MLP (64-64-10) on the
digits training set, minibatches of 64 drawn from a shuffled order, Adam. Three ways to
run it remotely, each sent without waiting, the clock stopping when the last loss
arrives:

* ``ops``: every step as 8 actions (slice of the order, two gathers, zero_grad, forward,
  loss, backward, step);
* ``plan``: the step recorded once as a plan (``duet.plan``), then 2 actions per step
  (the slice of the order, the plan call);
* ``plan_map``: the plan run over an epoch's batches (``step.map(order.split(64))``):
  3 actions per epoch.

Locally the same loop runs on plain tensors in one process. Both sides use one torch
thread (small ops: more threads only add contention), so the ratios measure what the
session costs per step.
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
EPOCHS = 20
WARMUP_EPOCHS = 2
BATCH = 64
MODES = ("ops", "plan", "plan_map")
ACTIONS = {"ops": "8 per step", "plan": "2 per step", "plan_map": "3 per epoch"}
GOAL_RATIO = 0.45


def _example(name: str) -> ModuleType:
    """``examples/train_digits/<name>.py`` as a module (the examples are not a package)."""
    spec = importlib.util.spec_from_file_location(f"train_digits_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_epochs(torch_ns: Any, model: Any, optimizer: Any, x: Any, y: Any, n: int,
                 epochs: int, batch: int = BATCH) -> Any:  # fmt: skip
    """The example's loop; the same code for tensors (``torch``) and pointers
    (``duet.torch``). Returns the last loss."""
    loss = None
    for _ in range(epochs):
        order = torch_ns.randperm(n)
        for start in range(0, n, batch):
            index = order[start : start + batch]
            optimizer.zero_grad()
            loss = torch_ns.nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
    return loss


class TrainingPeer(DuetPeer):
    """Owner: hosts the digits, accepts every request. Scientist: trains, remotely or not."""

    def __init__(self) -> None:
        super().__init__()
        self.model_ptr: Any = None
        self.optimizer_ptr: Any = None
        self.step: Any = None
        self.n = 0

    def handlers(self) -> Handlers:
        return {
            **super().handlers(),
            "host_digits": self.host_digits,
            "prepare": self.prepare,
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

    def prepare(self) -> None:
        """Scientist: send the example's model, make its optimizer, record the step plan."""
        import torch

        torch.set_num_threads(1)
        torch.manual_seed(0)
        for tag in ("x_train", "y_train"):
            self.find(tag)
        self.n = self.duet.store.info("x_train")["shape"][0]
        model = self.model_ptr = _example("scientist").build_model().send(self.duet)
        optimizer = self.optimizer_ptr = self.duet.torch.optim.Adam(model.parameters(), lr=1e-2)
        x, y = self.objects["x_train"], self.objects["y_train"]
        cross_entropy = self.duet.torch.nn.functional.cross_entropy

        def train_step(index: Any) -> Any:
            optimizer.zero_grad()
            loss = cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            return loss

        self.step = self.duet.plan(train_step)

    def train_remote(self, epochs: int, mode: str) -> dict[str, float]:
        """Scientist: ``epochs`` remote epochs; seconds to issue them and until the last
        loss arrived, and the number of steps."""
        import torch

        duet, n = self.duet, self.n
        steps = epochs * -(-n // BATCH)
        started = time.perf_counter()
        if mode == "ops":
            x, y = self.objects["x_train"], self.objects["y_train"]
            loss = train_epochs(duet.torch, self.model_ptr, self.optimizer_ptr, x, y, n, epochs)
        elif mode == "plan":
            for _ in range(epochs):
                order = duet.torch.randperm(n)
                for start in range(0, n, BATCH):
                    loss = self.step(order[start : start + BATCH])
        else:
            for _ in range(epochs):
                losses = self.step.map(duet.torch.randperm(n).split(BATCH))
            loss = losses[-1]
        issued = time.perf_counter() - started
        value = float(torch.as_tensor(loss.get(reason="benchmark", timeout_secs=300)))
        total = time.perf_counter() - started
        return {"issue_s": issued, "total_s": total, "steps": steps, "last_loss": value}

    def train_local(self, epochs: int) -> dict[str, float]:
        """Scientist: the same loop on a local copy of the data set, in this process."""
        import torch

        torch.set_num_threads(1)
        torch.manual_seed(0)
        split = _example("owner").load_split()
        model = _example("scientist").build_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        data = (split.x_train, split.y_train, len(split.y_train))
        train_epochs(torch, model, optimizer, *data, WARMUP_EPOCHS)
        started = time.perf_counter()
        loss = train_epochs(torch, model, optimizer, *data, epochs)
        value = float(loss.item())
        steps = epochs * -(-data[2] // BATCH)
        return {"total_s": time.perf_counter() - started, "steps": steps, "last_loss": value}


def peer() -> Handlers:
    return TrainingPeer().handlers()


def run(epochs: int = EPOCHS) -> dict[str, Any]:
    """Remote and local training steps per second and their ratios (goal: >= 0.45)."""
    with (
        start_signaling_server() as url,
        peers(("benchmarks.training:peer", "owner"), ("benchmarks.training:peer", "scientist")) as (
            owner,
            scientist,
        ),
    ):
        connect_duet(owner, scientist, url)
        owner.call("host_digits")
        scientist.call("prepare")
        remote = {}
        for mode in MODES:
            scientist.call("train_remote", epochs=WARMUP_EPOCHS, mode=mode)
            remote[mode] = scientist.call("train_remote", epochs=epochs, mode=mode, timeout=600)
        local = scientist.call("train_local", epochs=epochs, timeout=600)
        disconnect_duet(owner, scientist)
    local_rate = local["steps"] / local["total_s"]
    results: dict[str, Any] = {
        "model": "MLP 64-64-10 on digits, batch 64, Adam, 1 torch thread per process",
        "steps": local["steps"],
        "local_steps_per_s": local_rate,
        "local_ms_per_step": 1000 * local["total_s"] / local["steps"],
    }
    for mode, numbers in remote.items():
        rate = numbers["steps"] / numbers["total_s"]
        results[mode] = {
            "actions": ACTIONS[mode],
            "steps_per_s": rate,
            "ms_per_step": 1000 * numbers["total_s"] / numbers["steps"],
            "issue_us_per_step": 1e6 * numbers["issue_s"] / numbers["steps"],
            "ratio_to_local": rate / local_rate,
            "last_loss": numbers["last_loss"],
        }
    best = max(MODES, key=lambda mode: results[mode]["ratio_to_local"])
    results["ratio_remote_to_local"] = results[best]["ratio_to_local"]
    results["best_mode"] = best
    results["goal_ratio"] = GOAL_RATIO
    results["goal_met"] = results["ratio_remote_to_local"] >= GOAL_RATIO
    return results


run_benchmark = run


if __name__ == "__main__":
    import json

    numbers = run()
    print(json.dumps(numbers, indent=2))
    for mode in MODES:
        print(f"remote ({mode}, {ACTIONS[mode]}) / local training steps per second: "
              f"{numbers[mode]['ratio_to_local']:.2f}x")  # fmt: skip
    print(f"best: {numbers['ratio_remote_to_local']:.2f}x (goal >= {GOAL_RATIO}x)")
