#!/usr/bin/env bash
# bench/windowed.sh at each batch size and key count the performance issue
# sets goals for: 1, 5 and 20 files a trigger (50,000 rows a file), with
# 2,000 and with 100,000 users (ROWS, default 1,000,000). Each cell runs
# Sluice, Spark and the DataFusion batch limit on the same files and checks
# Sluice's and Spark's outputs equal row for row; then one table: rows/s of
# each, Sluice over Spark, Sluice's fraction of the limit, and how many of
# the cores Sluice kept busy.
#
# Run: bench/windowed-matrix.sh    Settings: ROWS, USERS_LIST ("2000 100000"),
# FILES_LIST ("1 5 20"), SLUICE_BIN, BENCH_DIR.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
source "$here/lib.sh"
build_sluice
make_work_dir sluice-windowed-matrix
export SLUICE_BIN=$sluice ROWS=${ROWS:-1000000}
for users in ${USERS_LIST:-2000 100000}; do
  for files in ${FILES_LIST:-1 5 20}; do
    say "users $users, $files files a trigger"
    USERS=$users FILES_PER_TRIGGER=$files BENCH_DIR="$work/u$users-f$files" \
      bash "$here/windowed.sh" | tee "$work/u$users-f$files.txt"
  done
done
python3 - "$work" "$ROWS" <<'PY'
import json, os, sys
work, rows = sys.argv[1], int(sys.argv[2])
print(f"\nThe fraud query, {rows:,} rows, {os.cpu_count()} cores (rows/s; Spark: its query's own time)")
print(f"{'users':>7} {'files':>5} {'Sluice':>10} {'Spark':>10} {'ratio':>6} {'DataFusion':>11} {'of limit':>8} {'cores':>5}")
for cell in sorted(os.listdir(work)):
    path = os.path.join(work, cell, "summary.json")
    if not os.path.isfile(path):
        continue
    s = json.load(open(path))
    users = cell.split("-")[0][1:]
    rate = lambda seconds: f"{rows / seconds:,.0f}"
    print(f"{int(users):>7,} {s['files_per_trigger']:>5} {rate(s['sluice_seconds']):>10} "
          f"{rate(s['spark_query_seconds']):>10} {s['spark_query_seconds'] / s['sluice_seconds']:>5.1f}x "
          f"{rate(s['datafusion_seconds']):>11} {s['datafusion_seconds'] / s['sluice_seconds']:>8.0%} "
          f"{s['sluice_cores_busy']:>5.2f}")
PY
