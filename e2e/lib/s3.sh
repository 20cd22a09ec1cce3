# A real S3-compatible server for e2e scripts: moto in server mode (PyPI), on
# a free loopback port (S3_PORT to choose it), with the bucket `checkpoints`
# and any named after WORK. `s3_start WORK [BUCKET...]` starts it (its log in
# WORK/moto.log) and exports what the engine reads, as a pod would from a
# Secret: AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, AWS_REGION, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY. `s3_stop` stops it (and waits until it is gone).

# shellcheck source=cleanup.sh
source "$(dirname "${BASH_SOURCE[0]}")/cleanup.sh"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

s3_start() {
  local work=$1
  shift
  python3 -c 'import moto, boto3' 2>/dev/null || {
    echo "moto is not installed: pip install 'moto[server]'" >&2; return 1; }
  S3_PORT=${S3_PORT:-$(free_port)}
  mkdir -p "$work"
  python3 -m moto.server -H 127.0.0.1 -p "$S3_PORT" > "$work/moto.log" 2>&1 &
  S3_PID=$!
  export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=sluice-test AWS_SECRET_ACCESS_KEY=sluice-test
  for _ in $(seq 1 100); do
    curl -fsS "$AWS_ENDPOINT_URL" > /dev/null 2>&1 && break
    sleep 0.1
  done
  python3 - checkpoints "$@" <<'PY'
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
for bucket in sys.argv[1:]:
    s3.create_bucket(Bucket=bucket)
PY
}

s3_stop() {
  stop_processes "${S3_PID:-}"
}
