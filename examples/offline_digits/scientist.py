"""The data scientist: submits a digits training + evaluation job, collects it later.

``submit`` records the job here, signs it with the scientist's identity and leaves it,
end-to-end encrypted, in the host's mailbox on the signaling server: the host may be
offline. ``collect`` reads the scientist's own mailbox, checks the host's signed receipt
against the job it signed, and prints the test accuracy and the trained model.

The job is a plan of allowlisted ops, no code: the model is built, trained (full-batch
Adam) and evaluated in the host's sandboxed worker. Only the two declared outputs can
leave, and only once the owner releases them.

Usage::

    python scientist.py submit HOST_ID HOST_KEY SIGNALING_URL   # prints the Job ID
    python scientist.py collect HOST_ID JOB_ID SIGNALING_URL [--timeout S]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import duet_p2p as sy

TRAIN_IMAGES, TRAIN_LABELS = "digits_train_images", "digits_train_labels"
TEST_IMAGES, TEST_LABELS = "digits_test_images", "digits_test_labels"
STEPS = 150
LEARNING_RATE = 0.02


def train_and_evaluate(torch: Any, x_train: Any, y_train: Any, x_test: Any, y_test: Any) -> Any:
    """An MLP (64 -> 64 -> 10) trained full-batch on the training set; its accuracy on the
    test set. ``torch`` here is the host's: every op is recorded, then run by the host."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x_train), y_train)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.eval()
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean()
    return accuracy, model


def submit(host_id: str, host_key: str, url: str) -> sy.Job:
    return sy.submit_job(
        host_id, train_and_evaluate,
        inputs={"x_train": TRAIN_IMAGES, "y_train": TRAIN_LABELS,
                "x_test": TEST_IMAGES, "y_test": TEST_LABELS},
        outputs=["accuracy", "model"],
        reason="digits MLP: test accuracy and the trained weights",
        signaling_url=url, host_key=host_key, max_seconds=300,
        deadline=time.time() + 2 * 86400,
    )  # fmt: skip


def collect(host_id: str, job_id: str, timeout: float) -> int:
    job = sy.jobs(host_id)[job_id]
    print(f"job {job.job_id}: {job.status}", flush=True)
    result = job.result(timeout=timeout)
    receipt = job.receipt
    assert receipt is not None
    receipt.verify()  # the host's key, this job, these bytes
    model = result["model"]
    parameters = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.rand(5, 64))
    print(f"receipt verified: signed by host {receipt.host_id}, job hash {receipt.job_hash[:16]}…")
    print(f"received the trained {type(model).__name__}: {parameters} parameters, "
          f"output shape {tuple(logits.shape)}")  # fmt: skip
    print(f"test accuracy: {float(result['accuracy']):.3f}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="record, sign and mail the job")
    p.add_argument("host_id")
    p.add_argument("host_key")
    p.add_argument("signaling_url")
    p = sub.add_parser("collect", help="wait for the results and check them")
    p.add_argument("host_id")
    p.add_argument("job_id")
    p.add_argument("signaling_url")
    p.add_argument("--timeout", type=float, default=300.0)
    options = parser.parse_args()
    if options.command == "submit":
        job = submit(options.host_id, options.host_key, options.signaling_url)
        print(f"Job ID: {job.job_id}", flush=True)
        return 0
    return collect(options.host_id, options.job_id, options.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
