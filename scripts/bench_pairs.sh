#!/usr/bin/env bash
# goemo's int8 inference against OpenVINO int8 (../shared/bench/ov_reference.py, SORT=1), run
# one after the other N times, alternating: these machines drift 20-50% within minutes, so one
# pass of scripts/bench.sh can land anywhere in that range; a ratio per adjacent pair and their
# median says more. Prints each pair, then the medians.
#
#   scripts/bench_pairs.sh [N=5]
#
# Env: TORCH_VENV (as scripts/bench.sh makes it: bench-results/torch-venv), THREADS (2),
#      MODEL_DIR, GE_DATA; BASELINE=path/to/an/older/goemo-bench runs it too in each round
#      (before/after in the same conditions).
set -euo pipefail
cd "$(dirname "$0")/.."
pairs="${1:-5}"
threads="${THREADS:-2}"
venv="${TORCH_VENV:-bench-results/torch-venv}"
target="${CARGO_TARGET_DIR:-target}"
export MODEL_DIR="${MODEL_DIR:-models/all-MiniLM-L6-v2}" GE_DATA="${GE_DATA:-data/goemotions}"
export THREADS="$threads" RAYON_NUM_THREADS="$threads" BENCH_DIR="${BENCH_DIR:-bench-results}"
[ -x "$venv/bin/python" ] || { echo "error: no venv at $venv: run scripts/bench.sh infer minilm once (it makes one)" >&2; exit 2; }
cargo build --release --quiet --bins --workspace
ex_per_s() { grep -o 'ex_per_s=[0-9.]*' | cut -d= -f2 | sort -g | tail -1; }
results=()
for i in $(seq "$pairs"); do
  b=0
  if [ -n "${BASELINE:-}" ]; then
    b=$("$BASELINE" infer minilm --precision int8 | ex_per_s)
  fi
  g=$("$target/release/goemo-bench" infer minilm --precision int8 | ex_per_s)
  # Two lines (the rest of the graph in f32, in bf16): the faster, as scripts/bench.sh takes.
  o=$(SORT=1 "$venv/bin/python" ../shared/bench/ov_reference.py int8 2>/dev/null | grep RESULT | ex_per_s)
  echo "round $i: goemo int8 $g ex/s, OpenVINO int8 $o ex/s, ratio $(python3 -c "print(f'{$g/$o:.2f}')")${BASELINE:+; baseline $b ex/s}"
  results+=("$g $o $b")
done
printf '%s\n' "${results[@]}" | python3 -c '
import statistics, sys
rows = [tuple(map(float, l.split())) for l in sys.stdin if l.strip()]
g, o, b = zip(*rows)
ratios = [r[0] / r[1] for r in rows]
print(f"median of {len(rows)} rounds: goemo int8 {statistics.median(g):.0f} ex/s, OpenVINO int8 {statistics.median(o):.0f} ex/s, "
      f"goemo/OpenVINO {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")
if all(b):
    base = [r[0] / r[2] for r in rows]
    print(f"  baseline {statistics.median(b):.0f} ex/s, this build / baseline {statistics.median(base):.2f} "
          f"(range {min(base):.2f}-{max(base):.2f}); baseline/OpenVINO {statistics.median([r[2] / r[1] for r in rows]):.2f}")'
