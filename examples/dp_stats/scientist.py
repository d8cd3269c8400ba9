"""The data scientist: asks differentially private questions of a table it never sees.

Each answer is noisy; each question costs privacy budget; the owner's rule answers at once
while budget is left, and past it the owner refuses before computing anything.

Usage: ``python scientist.py DUET_ID SIGNALING_URL``
"""

from __future__ import annotations

import argparse
import time

import duet_p2p as sy

DATASET = "diabetes"


def wait_for_data(duet: sy.Duet, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(duet.store.refresh()) < 1:
        if time.monotonic() > deadline:
            raise TimeoutError("the owner hosted nothing")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("duet_id")
    parser.add_argument("signaling_url")
    options = parser.parse_args()
    duet = sy.join_duet(options.duet_id, signaling_url=options.signaling_url)
    wait_for_data(duet)
    print(duet.store)
    print("columns:", duet.store.info(DATASET)["schema"]["columns"])
    table = duet.store[DATASET]
    ask = {"timeout_secs": 60}
    patients = duet.dp.count(table, epsilon=0.1, **ask)
    print(f"patients: about {patients}")
    age = duet.dp.mean(table, "age", bounds=(0, 100), epsilon=0.2, **ask)
    print(f"mean age: about {age:.1f}")
    by_sex = duet.dp.histogram(table, "sex", epsilon=0.1, **ask)
    print("patients by sex:", dict(zip(by_sex.categories, by_sex.counts, strict=True)))
    heavy = duet.dp.mean(table, "progression", where=[("bmi", ">=", 30)], bounds=(0, 400),
                         epsilon=0.3, **ask)  # fmt: skip
    print(f"mean progression score with BMI >= 30: about {heavy:.0f}")
    median = duet.dp.quantile(table, 0.5, "bmi", bounds=(10, 50), epsilon=0.2, **ask)
    print(f"median BMI: about {median:.1f}")
    print(duet.dp.budget)
    try:
        duet.dp.sum(table, "progression", bounds=(0, 400), epsilon=0.3, **ask)
    except sy.BudgetExceeded as exc:
        print(f"refused: {exc}")
    duet.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
