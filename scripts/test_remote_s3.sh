#!/usr/bin/env bash
# The S3 remote against a real S3 protocol server on loopback: moto's (moto[server] from PyPI;
# installed here when missing). Starts the server on a free port, creates the bucket
# goemo-cache, runs the S3 tests with GOEMO_TEST_S3_ENDPOINT pointing at it (the remote crate's
# push/pull test, and four sweep workers sharing only the server), and stops the server
# whatever happens. Any access key and secret work against moto.
#
#   scripts/test_remote_s3.sh            # extra args go to cargo test
#
# Env: CARGO_TARGET_DIR as for cargo.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v moto_server >/dev/null 2>&1; then
    echo "moto_server not found: installing moto[server] from PyPI" >&2
    python3 -m pip install --quiet 'moto[server]'
fi

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log="$(mktemp)"
moto_server -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
moto_pid=$!
stop() {
    kill "$moto_pid" 2>/dev/null || true
    wait "$moto_pid" 2>/dev/null || true
    rm -f "$log"
}
trap stop EXIT

endpoint="http://127.0.0.1:$port"
for _ in $(seq 150); do
    # Unsigned requests are accepted by moto: create the bucket once the server answers.
    if curl -fsS -X PUT "$endpoint/goemo-cache" >/dev/null 2>&1; then
        break
    fi
    sleep 0.1
done
curl -fsS "$endpoint/goemo-cache" >/dev/null || {
    echo "moto_server did not come up on $endpoint:" >&2
    cat "$log" >&2
    exit 1
}

GOEMO_TEST_S3_ENDPOINT="$endpoint" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
    AWS_REGION=us-east-1 \
    nice -n 19 cargo test --release -p goemo-remote --test s3_moto "$@" -- --nocapture
# Four workers with their own folders, sharing only the S3 server (leases, pulls, records).
GOEMO_TEST_S3_ENDPOINT="$endpoint" \
    nice -n 19 cargo test --release -p goemo --test remote "$@" -- --nocapture four_workers_sharing_only_an_s3_remote
