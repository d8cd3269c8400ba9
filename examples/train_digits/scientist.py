"""The data scientist: trains an MLP on the owner's digits without ever seeing them.

The model is built here and sent to the owner as data (its layers and weights, no
code). Every training step runs in the owner's process: the scientist only sends
actions, without waiting for replies. Then it asks for one number, the test accuracy
(one request), and for the trained weights (one more request).

Each step here is 8 small actions. For speed, record the step once as a plan and let the
owner replay it (see ``duet_p2p.scientist.plans``)::

    step = duet.plan(lambda index: ...)      # the body of the inner loop, returning loss
    losses = step.map(duet.torch.randperm(n_train).split(BATCH))   # a whole epoch

Usage: ``python scientist.py DUET_ID SIGNALING_URL``
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import duet_p2p as sy

TRAIN_IMAGES, TRAIN_LABELS = "digits_train_images", "digits_train_labels"
TEST_IMAGES, TEST_LABELS = "digits_test_images", "digits_test_labels"
EPOCHS = 8
BATCH = 64


def build_model() -> nn.Sequential:
    """64 pixels -> 64 hidden units -> 10 classes."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def wait_for_data(duet: sy.Duet, count: int = 4, timeout: float = 30.0) -> None:
    """Until the owner has hosted ``count`` objects (a person would look at duet.store)."""
    deadline = time.monotonic() + timeout
    while len(duet.store) < count:
        if time.monotonic() > deadline:
            raise SystemExit("the owner did not host the data in time")
        time.sleep(0.1)


def train(
    duet: sy.Duet, model_ptr: sy.Pointer, epochs: int = EPOCHS, batch: int = BATCH
) -> tuple[sy.Pointer, int]:
    """Minibatch Adam on the owner's training set; returns the last loss pointer and the
    number of steps. Nothing here waits for the owner."""
    x_train, y_train = duet.store[TRAIN_IMAGES], duet.store[TRAIN_LABELS]
    n_train = duet.store.info(TRAIN_IMAGES)["shape"][0]  # the owner shows shapes
    optimizer = duet.torch.optim.Adam(model_ptr.parameters(), lr=1e-2)
    cross_entropy = duet.torch.nn.functional.cross_entropy
    model_ptr.train()
    steps, loss = 0, None
    for _ in range(epochs):
        order = duet.torch.randperm(n_train)  # shuffled in the owner's process
        for start in range(0, n_train, batch):
            index = order[start : start + batch]
            optimizer.zero_grad()
            loss = cross_entropy(model_ptr(x_train[index]), y_train[index])
            loss.backward()
            optimizer.step()
            steps += 1
    assert loss is not None
    return loss, steps


def test_accuracy(duet: sy.Duet, model_ptr: sy.Pointer) -> sy.Pointer:
    """A pointer to the accuracy on the owner's test set (evaluated without gradients)."""
    x_test, y_test = duet.store[TEST_IMAGES], duet.store[TEST_LABELS]
    with duet.no_grad():
        model_ptr.eval()
        predicted = model_ptr(x_test).argmax(dim=1)
        return (predicted == y_test).float().mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("duet_id")
    parser.add_argument("signaling_url")
    options = parser.parse_args()
    torch.manual_seed(0)
    duet = sy.join_duet(options.duet_id, signaling_url=options.signaling_url)
    wait_for_data(duet)
    print(duet.store)

    model = build_model()
    model_ptr = model.send(duet)  # layers and weights as data; a custom Module is refused
    started = time.perf_counter()
    _, steps = train(duet, model_ptr)
    accuracy_ptr = test_accuracy(duet, model_ptr)
    accuracy = accuracy_ptr.get(reason="test accuracy of the trained MLP", timeout_secs=90)
    seconds = time.perf_counter() - started
    print(f"{steps} remote training steps and the evaluation took {seconds:.1f} s")

    trained = model_ptr.get(reason="the trained weights", timeout_secs=60)
    parameters = sum(p.numel() for p in trained.parameters())
    with torch.no_grad():
        logits = trained(torch.rand(5, 64))
    assert logits.shape == (5, 10), logits.shape
    changed = not torch.equal(trained[0].weight, model[0].weight)
    print(f"received the trained {type(trained).__name__}: {parameters} parameters, "
          f"weights changed by training: {changed}, works on random input: {tuple(logits.shape)}")  # fmt: skip
    print(f"test accuracy: {accuracy:.3f}")
    duet.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
