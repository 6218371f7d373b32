#!/usr/bin/env bash
# The shared cache against real object-store protocols on loopback: moto's S3 server
# (`moto[server]` from PyPI) and Azurite's Blob Storage (`azurite` from npm), each installed
# here when missing. Starts both on free ports, creates a bucket / container `goemo-cache`,
# runs the remote crate's S3 test, then tests/remote.rs's real-store test (a fresh clone pulls
# everything; four workers sharing only the store build an upstream once) once per store, and
# stops the servers whatever happens.
#
#   scripts/test_remote_stores.sh [--locked]     # args go to cargo test
#
# Env: CARGO_TARGET_DIR as for cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="${GOEMO_TEST_TOOLS:-$HOME/.cache/goemo-test-tools}"

if ! command -v moto_server >/dev/null 2>&1; then
    echo "moto_server not found: installing moto[server] from PyPI" >&2
    python3 -m pip install --quiet 'moto[server]'
fi
azurite="$tools/azurite/node_modules/.bin/azurite-blob"
if [ ! -x "$azurite" ]; then
    echo "azurite not found: installing it from npm into $tools/azurite" >&2
    mkdir -p "$tools/azurite"
    npm install --silent --no-audit --no-fund --prefix "$tools/azurite" azurite@3 >/dev/null
fi
if ! python3 -c 'import azure.storage.blob' 2>/dev/null; then
    # Only to create the test container (object_store does not create containers).
    echo "installing azure-storage-blob from PyPI (to create the test container)" >&2
    python3 -m pip install --quiet azure-storage-blob
fi

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
work="$(mktemp -d)"
pids=()
stop() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap stop EXIT

s3_port="$(free_port)"
moto_server -H 127.0.0.1 -p "$s3_port" >"$work/moto.log" 2>&1 &
pids+=($!)
az_port="$(free_port)"
mkdir -p "$work/azurite"
"$azurite" --silent --disableTelemetry --skipApiVersionCheck --location "$work/azurite" \
    --blobHost 127.0.0.1 --blobPort "$az_port" >"$work/azurite.log" 2>&1 &
pids+=($!)

s3="http://127.0.0.1:$s3_port"
for _ in $(seq 150); do
    # Unsigned requests are accepted by moto: create the bucket once the server answers.
    curl -fsS -X PUT "$s3/goemo-cache" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS "$s3/goemo-cache" >/dev/null || {
    echo "moto_server did not come up on $s3:" >&2
    cat "$work/moto.log" >&2
    exit 1
}
az_conn="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:$az_port/devstoreaccount1;"
made=0
for _ in $(seq 150); do
    AZ_CONN="$az_conn" python3 -c '
import os
from azure.storage.blob import BlobServiceClient
BlobServiceClient.from_connection_string(os.environ["AZ_CONN"]).create_container("goemo-cache")
' >"$work/container.log" 2>&1 && { made=1; break; }
    sleep 0.2
done
[ "$made" = 1 ] || {
    echo "could not create the container on Azurite (127.0.0.1:$az_port):" >&2
    tail -5 "$work/container.log" "$work/azurite.log" >&2
    exit 1
}

export GOEMO_TEST_S3_ENDPOINT="$s3"
AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 \
    nice -n 19 cargo test --release -p goemo-remote --test s3_moto "$@" -- --nocapture
unset GOEMO_TEST_S3_ENDPOINT

echo "== S3 (moto on $s3)"
GOEMO_TEST_REMOTE=s3://goemo-cache AWS_ENDPOINT_URL="$s3" AWS_ACCESS_KEY_ID=testing \
    AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 \
    nice -n 19 cargo test --release -p goemo --test remote "$@" -- --nocapture a_real_store
echo "== Azure Blob Storage (Azurite on 127.0.0.1:$az_port)"
# Azurite's well-known development account, as object_store's emulator mode uses it.
GOEMO_TEST_REMOTE=az://goemo-cache AZURE_STORAGE_USE_EMULATOR=true \
    AZURITE_BLOB_STORAGE_URL="http://127.0.0.1:$az_port" \
    nice -n 19 cargo test --release -p goemo --test remote "$@" -- --nocapture a_real_store
