"""One Nexmark query (bench/nexmark/queries.py) on Apache Flink (PyFlink,
its local mini-cluster), in streaming mode.

    flink-python bench/nexmark/flink_nexmark.py QUERY INPUT_DIR OUTPUT_DIR RESULT_JSON SIDE_INPUT_CSV

Reads the bid table's JSON-lines files (a bounded filesystem source: at its
end the watermark jumps to the end of time and every window closes) with
Nexmark's 4-second watermark, runs the query's Flink SQL at parallelism
2 (run.sh cuts the input in two files, one a reader), with the side input
(a CSV file without a header row) as the bounded table `side_input` when the
query joins it, writes JSON lines with the filesystem sink (committed on
checkpoints, every 2 s, and at the end of input; partitioned as the query
says), and writes
Flink's version and the job's own time (submitted to finished) to
RESULT_JSON.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pyflink.table import (  # noqa: E402
    EnvironmentSettings,
    FormatDescriptor,
    Schema,
    TableDescriptor,
    TableEnvironment,
)
from queries import BID_COLUMNS, QUERIES, WATERMARK_SECONDS  # noqa: E402

TYPES = {"long": "BIGINT", "string": "STRING", "timestamp": "TIMESTAMP_LTZ(3)"}


def main() -> None:
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    name, input_dir, output_dir, result_path, side_input = sys.argv[1:]
    env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    config = env.get_config()
    # Two readers, one for each of run.sh's two input files.
    config.set("parallelism.default", "2")
    config.set("table.local-time-zone", "UTC")
    config.set("execution.checkpointing.interval", "2 s")
    columns = ",\n  ".join(f"`{column}` {TYPES[ty]}" for column, ty in BID_COLUMNS)
    env.execute_sql(
        f"""CREATE TABLE bid (
  {columns},
  WATERMARK FOR `datetime` AS `datetime` - INTERVAL '{WATERMARK_SECONDS}' SECOND
) WITH (
  'connector' = 'filesystem', 'path' = 'file://{input_dir}', 'format' = 'json',
  'json.timestamp-format.standard' = 'ISO-8601'
)"""
    )
    q = QUERIES[name]
    if q.get("side_input"):
        env.execute_sql(
            f"""CREATE TABLE side_input (`key` BIGINT, `value` STRING) WITH (
  'connector' = 'filesystem', 'path' = 'file://{side_input}', 'format' = 'csv'
)"""
        )
    query = env.sql_query(q["flink"])
    sink = TableDescriptor.for_connector("filesystem").schema(
        Schema.new_builder().from_row_data_type(query.get_schema().to_row_data_type()).build()
    )
    if q.get("partition_by"):
        sink = sink.partitioned_by(*q["partition_by"])
    env.create_temporary_table(
        "nexmark_result",
        sink.option("path", f"file://{output_dir}")
        .format(
            FormatDescriptor.for_format("json")
            .option("timestamp-format.standard", "ISO-8601")
            .build()
        )
        .build(),
    )
    started = time.perf_counter()
    query.execute_insert("nexmark_result").wait()
    seconds = time.perf_counter() - started
    from importlib.metadata import version

    with open(result_path, "w") as out:
        json.dump({"flink_version": version("apache-flink"), "query_seconds": seconds}, out)


if __name__ == "__main__":
    main()
