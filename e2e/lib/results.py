"""What the Python e2e checks share: the fraud query and its input's schema,
result rows compared with a float tolerance, the committed files and rows
of a file sink's directory, and the ok/FAIL lines the scripts print."""

import json
import math
import os
import sys

TX_SCHEMA = """[{name: transaction_id, type: string}, {name: user_id, type: string},
               {name: amount, type: double}, {name: event_time, type: timestamp}]"""
FRAUD = """SELECT window_start, window_end, user_id,
           count(*) AS n, sum(amount) AS total, avg(amount) AS avg_amount
    FROM hop(transactions, event_time, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE)
    GROUP BY window_start, window_end, user_id
    HAVING count(*) >= 4 OR sum(amount) > 2000"""


def ok(message):
    print(f"ok   {message}", flush=True)


def fail(message):
    print(f"FAIL {message}", flush=True)
    sys.exit(1)


class Row:
    """A result row: equal to another when every field is, floats to a
    relative 1e-9 (sums add in another order after a restart)."""

    def __init__(self, row):
        self.exact = tuple(sorted((k, v) for k, v in row.items() if not isinstance(v, float)))
        self.floats = tuple(sorted((k, v) for k, v in row.items() if isinstance(v, float)))

    def __eq__(self, other):
        return self.exact == other.exact and len(self.floats) == len(other.floats) and all(
            a[0] == b[0] and math.isclose(a[1], b[1], rel_tol=1e-9)
            for a, b in zip(self.floats, other.floats))

    def key(self):
        # NB: None (a null column, such as an unknown country) sorts first.
        return tuple((k, v is not None, "" if v is None else v) for k, v in self.exact + self.floats)

    def __lt__(self, other):
        return self.key() < other.key()

    def __repr__(self):
        return repr(dict(self.exact + self.floats))


def compare(actual, expected, what, where="actual"):
    """Fails unless the rows are the same, each as often."""
    actual, expected = sorted(actual), sorted(expected)
    if actual != expected:
        exact = [r.exact for r in actual]
        duplicated = len(exact) - len(set(exact))
        differing = [(a, b) for a, b in zip(actual, expected) if a != b][:2]
        fail(f"{what}: {len(actual)} rows ({duplicated} duplicated) where the reference has "
             f"{len(expected)}; first differences ({where}, reference): {differing}")


def committed_files(directory):
    """The data files of the batches a local file sink committed, by batch:
    the newest compact manifest (every batch up to it; older manifests may
    be gone), then the manifests after it."""
    meta = os.path.join(directory, "_sluice_metadata")
    names = os.listdir(meta)
    compacts = sorted(int(n[:-len(".compact")]) for n in names if n.endswith(".compact"))
    batches = {}
    if compacts:
        for m in json.load(open(os.path.join(meta, f"{compacts[-1]}.compact")))["batches"]:
            batches[m["batchId"]] = m["files"]
    for name in names:
        if name.isdigit() and (not compacts or int(name) > compacts[-1]):
            batches[int(name)] = json.load(open(os.path.join(meta, name)))["files"]
    return [os.path.join(directory, f["path"]) for b in sorted(batches) for f in batches[b]]


def committed_rows(directory, row=Row):
    """The rows of the batches a local JSON file sink committed (the data
    files its manifests list), each made with `row`."""
    rows = []
    for path in committed_files(directory):
        with open(path) as data:
            rows.extend(row(json.loads(line)) for line in data if line.strip())
    return sorted(rows)
