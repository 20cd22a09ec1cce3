"""The limit for bench/windowed.sh: the fraud query's aggregation as one
batch query on DataFusion (the Python package, the engine Sluice runs on)
over the same JSON-lines files, every core, planned two ways: the naive
window expansion (each row copied into its five windows) and panes (rows
aggregated per user and minute, then each pane's sums into the five windows
holding it, as Sluice's state keeps them). The faster is the limit.

It computes every window, where the streaming run emits only those its last
watermark closed, so its row count is a little higher; what it shows is how
fast the engine under Sluice does the same work with no micro-batches, no
state store and no checkpoint. Prints one JSON line: seconds of the faster
plan (planning, reading and aggregating; the Python start-up left out),
each plan's seconds, and rows (both plans must agree).

  python3 bench/datafusion_windowed.py INPUT_DIR MIN_COUNT
"""

import json
import os
import sys
import time

import pyarrow as pa
from datafusion import SessionConfig, SessionContext

SCHEMA = pa.schema([
    ("transaction_id", pa.string()), ("user_id", pa.string()), ("amount", pa.float64()),
    ("merchant_id", pa.string()), ("event_time", pa.timestamp("us", tz="UTC")), ("device_type", pa.string()),
])

MINUTE_US = 60_000_000


def main():
    input_dir, min_count = sys.argv[1], int(sys.argv[2])
    extension = os.path.splitext(sorted(os.listdir(input_dir))[0])[1]
    ctx = SessionContext(SessionConfig().with_target_partitions(os.cpu_count() or 1))
    ctx.register_json("transactions", input_dir, schema=SCHEMA, file_extension=extension)
    naive = f"""
    WITH expanded AS (
      SELECT t.user_id, t.amount,
             (CAST(arrow_cast(t.event_time, 'Int64') / {MINUTE_US} AS BIGINT) - k.k) * {MINUTE_US} AS start_us
      FROM transactions t CROSS JOIN (VALUES (0), (1), (2), (3), (4)) AS k(k)
    )
    SELECT to_timestamp_micros(start_us) AS window_start,
           to_timestamp_micros(start_us + 5 * {MINUTE_US}) AS window_end, user_id,
           count(*) AS n, sum(amount) AS total, avg(amount) AS avg_amount
    FROM expanded
    GROUP BY start_us, user_id
    HAVING count(*) >= {min_count}
    """
    panes = f"""
    WITH panes AS (
      SELECT user_id, CAST(arrow_cast(event_time, 'Int64') / {MINUTE_US} AS BIGINT) AS pane,
             count(*) AS n, sum(amount) AS total
      FROM transactions
      GROUP BY 1, 2
    ), windows AS (
      SELECT p.user_id, (p.pane - k.k) * {MINUTE_US} AS start_us, p.n, p.total
      FROM panes p CROSS JOIN (VALUES (0), (1), (2), (3), (4)) AS k(k)
    )
    SELECT to_timestamp_micros(start_us) AS window_start,
           to_timestamp_micros(start_us + 5 * {MINUTE_US}) AS window_end, user_id,
           sum(n) AS n, sum(total) AS total, sum(total) / sum(n) AS avg_amount
    FROM windows
    GROUP BY start_us, user_id
    HAVING sum(n) >= {min_count}
    """
    out = {}
    for name, sql in (("naive", naive), ("panes", panes)):
        start = time.time()
        batches = ctx.sql(sql).collect()
        out[f"{name}_seconds"] = time.time() - start
        out[f"{name}_rows"] = sum(b.num_rows for b in batches)
    if out["naive_rows"] != out["panes_rows"]:
        sys.exit(f"the two plans disagree: {out}")
    out.update(seconds=min(out["naive_seconds"], out["panes_seconds"]), rows=out["naive_rows"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
