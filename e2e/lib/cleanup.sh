# What the e2e scripts' EXIT traps do: stop the processes a test started and
# wait for them, then remove its work directory.
#
#   source e2e/lib/cleanup.sh
#   trap 'stop_processes "${pids[@]}"; remove_dir "$work"' EXIT
#
# A process still writing in the directory (a `sluice run` finishing its
# batch on SIGTERM, as CI saw in e2e/prometheus.sh; a broker flushing) makes
# `rm -rf` fail with "Directory not empty";
# under `set -e` that failure in a trap would become the script's exit status
# after every check had passed. So: SIGTERM, wait up to 10 s, SIGKILL; and the
# removal is retried, and only warns if it still fails: a test's result is its
# checks', not its cleanup's.

# Stops each PID (children of this shell or not) and waits until it is gone.
stop_processes() {
  local pid
  for pid in "$@"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "$@"; do
    [ -n "$pid" ] || continue
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  return 0
}

# Removes DIR, retrying while something still writes in it; never fails.
remove_dir() {
  local dir=$1
  for _ in 1 2 3 4 5; do
    rm -rf "$dir" 2>/dev/null && return 0
    sleep 1
  done
  echo "warning: could not remove $dir (something still writes in it)" >&2
  return 0
}
