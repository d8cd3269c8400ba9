"""The data owner: hosts a diabetes study table and lets a rule answer DP questions.

The table is scikit-learn's diabetes data set (442 patients; shipped with the package,
nothing is downloaded), hosted as a DataFrame: its column names are listed, its values
and its number of rows are not. The owner's rules:

* each scientist may spend epsilon 1.0 on it, over all their questions;
* a differentially private statistic costing at most 0.3 is released by a rule, at once,
  within that budget (the debit is written to the ledger before the value leaves);
* everything else (an exact value) waits for the owner; this script denies it after 10 s.

Usage: ``python owner.py [--audit PATH] [--ledger PATH] SIGNALING_URL`` (the scientist's
Client ID is read at the prompt).
"""

from __future__ import annotations

import argparse

import duet_p2p as sy

DATASET = "diabetes"
BUDGET = 1.0
MAX_EPSILON_PER_QUERY = 0.3


def load_table():  # noqa: ANN201 - a pandas DataFrame
    """Age, sex, BMI, blood pressure and the disease progression score of each patient."""
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True, scaled=False).frame
    frame = frame.rename(columns={"bp": "blood_pressure", "target": "progression"})
    frame["sex"] = frame["sex"].map({1.0: "female", 2.0: "male"})
    return frame[["age", "sex", "bmi", "blood_pressure", "progression"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("signaling_url")
    parser.add_argument(
        "--audit", default=None, help="audit log path (default: in the data directory)"
    )
    parser.add_argument("--ledger", default=None, help="privacy ledger file (default: per user)")
    options = parser.parse_args()
    duet = sy.launch_duet(
        signaling_url=options.signaling_url, audit_path=options.audit, dp_ledger=options.ledger
    )
    duet.store.send(load_table(), tags=[DATASET], description="diabetes study, one row a patient")
    duet.dp.set_budget(dataset=DATASET, epsilon=BUDGET)
    duet.requests.add_handler("accept", dp=True, max_epsilon=MAX_EPSILON_PER_QUERY,
                              name="DP within budget")  # fmt: skip
    duet.requests.add_handler("deny", timeout_secs=10, reason="exact values need the owner")
    print(duet.store, flush=True)
    if not duet.wait_closed(timeout=110):
        print("the scientist did not finish in time")
        duet.close()
        return 1
    print(duet.dp.budget)
    print(duet.dp.debits)
    duet.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
