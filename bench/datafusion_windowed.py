"""The limit for bench/windowed.sh: the fraud query's aggregation as one
batch query on DataFusion (the Python package, the engine Sluice runs on)
over the same JSON-lines files, with the same naive window expansion as
Sluice's `hop` (each row copied into its five windows), every core.

It computes every window, where the streaming run emits only those its last
watermark closed, so its row count is a little higher; what it shows is how
fast the engine under Sluice does the same work with no micro-batches, no
state store and no checkpoint. Prints one JSON line: seconds of the query
(planning, reading and aggregating; the Python start-up left out) and rows.

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
    sql = f"""
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
    start = time.time()
    batches = ctx.sql(sql).collect()
    seconds = time.time() - start
    print(json.dumps({"seconds": seconds, "rows": sum(b.num_rows for b in batches)}))


if __name__ == "__main__":
    main()
