"""The data owner: hosts the digits images as private train and test tensors.

The data set is scikit-learn's 8x8 handwritten digits (shipped with the package, nothing
is downloaded). Nothing leaves this process unless a rule below, or the person running
it, accepts a request. The rules a careful owner sets for a remote training session:

* the test accuracy: a single number, a mean whose lineage reaches the test labels, a
  few times at most. The session's minimum aggregation (100 records) counts only sums and
  means straight over the owner's records, so a model's accuracy counts as one record;
  this handler accepts it by its op and tags instead (``min_aggregation=1``; and,
  since an accuracy is a rescaled count of correct answers, which the disclosure checks
  cannot read, ``ignore_disclosure_checks=True``), and everything else still needs 100
  records per number;
* the trained model, once: an ``nn.Module`` of modest size that never saw the test set
  (its lineage carries no test tag); the weights are a summary of the training set, but
  a model can memorise its data, so the owner caps its size and counts the releases;
* everything else waits for the owner; this script denies it after 30 s.

Usage: ``python owner.py [--audit PATH] SIGNALING_URL`` (the scientist's Client ID is
read at the prompt).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

import duet_p2p as sy
from duet_p2p.permissions import Request

TRAIN_IMAGES, TRAIN_LABELS = "digits_train_images", "digits_train_labels"
TEST_IMAGES, TEST_LABELS = "digits_test_images", "digits_test_labels"
TEST_SIZE = 360
MIN_AGGREGATION = 100
MAX_MODEL_PARAMETERS = 100_000


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_split(seed: int = 0) -> Split:
    """The digits as float images in [0, 1] (64 pixels each) and int64 labels, split once."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    return Split(x[train], y[train], x[test], y[test])


def host(duet: sy.Duet, split: Split) -> None:
    """Host the four tensors, private, with their shapes shown in the listing."""
    for value, tag, what in (
        (split.x_train, TRAIN_IMAGES, "training images, 64 pixels in [0, 1] each"),
        (split.y_train, TRAIN_LABELS, "training labels, digits 0-9"),
        (split.x_test, TEST_IMAGES, "test images, 64 pixels in [0, 1] each"),
        (split.y_test, TEST_LABELS, "test labels, digits 0-9"),
    ):
        duet.store.send(value, tags=[tag], description=what, show_metadata=True)


class ReleaseTrainedModel:
    """Accept a request for a trained model: an ``nn.Module`` of at most ``max_parameters``
    elements whose lineage never touched ``forbidden_tags``, ``max_releases`` times."""

    def __init__(
        self, max_parameters: int, forbidden_tags: set[str], max_releases: int = 1
    ) -> None:
        self.max_parameters = max_parameters
        self.forbidden_tags = forbidden_tags
        self.max_releases = max_releases
        self.released = 0

    def __call__(self, request: Request) -> None:
        if not request.pending or self.released >= self.max_releases:
            return
        if request.elements > self.max_parameters or request.tags & self.forbidden_tags:
            return
        if not isinstance(request.preview(), torch.nn.Module):
            return
        self.released += 1
        request.accept()


def set_policy(duet: sy.Duet) -> ReleaseTrainedModel:
    """The release rules described at the top of this file."""
    requests = duet.requests
    requests.add_handler(
        "accept", op="mean", tags=[TEST_LABELS], max_elements=1, max_requests=3,
        name="test accuracy", min_aggregation=1, ignore_disclosure_checks=True,
    )  # fmt: skip
    release_model = ReleaseTrainedModel(MAX_MODEL_PARAMETERS, {TEST_IMAGES, TEST_LABELS})
    requests.add_callback(release_model)
    requests.add_handler(
        "deny", timeout_secs=30, reason="not released by this owner's rules; ask the owner"
    )
    return release_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("signaling_url")
    parser.add_argument(
        "--audit", default=None, help="audit log path (default: in the data directory)"
    )
    options = parser.parse_args()
    torch.set_num_threads(1)  # small ops: one thread avoids contention with the session's
    torch.manual_seed(0)
    duet = sy.launch_duet(
        signaling_url=options.signaling_url,
        audit_path=options.audit,
        min_aggregation=MIN_AGGREGATION,
        limits=sy.OwnerLimits(max_peer_bytes=512 * 1024**2, max_op_seconds=10.0),
    )
    set_policy(duet)
    host(duet, load_split())
    print(duet.store, flush=True)
    if not duet.wait_closed(timeout=110):
        print("the scientist did not finish in time")
        duet.close()
        return 1
    releases = [e for e in duet.audit.entries() if e.get("event") == "release"]
    print(f"released {len(releases)} values; the audit log is {duet.audit.path}")
    for request in duet.requests.all():
        print(f"  {request.name}: {request.status.value} by {request.decided_by}")
    duet.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
