#!/usr/bin/env bash
# goemo vs the PyTorch reference (../shared/bench/torch_reference.py), one after the other on
# the same machine, data and batches; prints both figures and the ratio.
#
#   scripts/bench.sh [tokenize|train|infer|predict|noop|all] [minilm|distilbert|both]
#
# predict: `goemo predict --file` over the 5,427 test texts with the model in outputs/model (or
# PREDICT_MODEL), three runs, median (tokenizing and scoring; model load excluded).
#
# Env: TORCH_VENV (a venv with torch, transformers, tokenizers; made if missing, ~6 GB),
#      BENCH_DIR (results and the shared batch file; default bench-results/), THREADS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
models="${2:-both}"
[ "$models" = both ] && models="minilm distilbert"
threads="${THREADS:-2}"
out="${BENCH_DIR:-bench-results}"
mkdir -p "$out"
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --quiet --bins --workspace
goemo="$target/release/goemo"
bench="$target/release/goemo-bench"
reference=../shared/bench/torch_reference.py
venv="${TORCH_VENV:-$out/torch-venv}"
export MODEL_DIR="${MODEL_DIR:-models/all-MiniLM-L6-v2}" GE_DATA="${GE_DATA:-data/goemotions}"
export BENCH_BATCHES="$out/bench_batches.json" THREADS="$threads" RAYON_NUM_THREADS="$threads"

torch() {
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch transformers tokenizers safetensors numpy
  fi
  "$venv/bin/python" "$reference" "$@"
}

# RESULT lines → key=value lookups.
val() { grep -oE "(^| )$2=[0-9.]*" <<<"$1" | head -1 | cut -d= -f2; }
ratio() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.2f}x' if b else 'n/a')" "$1" "$2"; }

log="$out/bench-$(date +%Y%m%d-%H%M%S).log"
echo "# $(date -u) $(nproc) cores; threads=$threads; GLIBC_TUNABLES=${GLIBC_TUNABLES:-unset}" | tee "$log"

if [ "$what" = all ] || [ "$what" = tokenize ]; then
  t=$(torch tokenize | tee -a "$log" | grep RESULT)
  g1=$(RAYON_NUM_THREADS=1 "$bench" tokenize | tee -a "$log" | grep RESULT)
  gn=$(RAYON_NUM_THREADS="$threads" "$bench" tokenize | tee -a "$log" | grep RESULT)
  echo "tokenize texts/s: python tokenizers $(val "$t" texts_per_s); goemo 1 thread $(val "$g1" texts_per_s) ($(ratio "$(val "$g1" texts_per_s)" "$(val "$t" texts_per_s)")), $threads threads $(val "$gn" texts_per_s) ($(ratio "$(val "$gn" texts_per_s)" "$(val "$t" texts_per_s)")); tokens/s goemo $(val "$gn" tokens_per_s)" | tee -a "$log"
fi
[ -f "$BENCH_BATCHES" ] || torch tokenize >/dev/null
for m in $models; do
  if [ "$what" = all ] || [ "$what" = train ]; then
    t=$(torch train "$m" | tee -a "$log" | grep RESULT)
    g=$("$bench" train "$m" | tee -a "$log" | grep RESULT)
    echo "train $m ex/s: pytorch $(val "$t" ex_per_s), goemo $(val "$g" ex_per_s) ($(ratio "$(val "$g" ex_per_s)" "$(val "$t" ex_per_s)")); peak RSS MiB pytorch $(val "$t" peak_rss_mib), goemo $(val "$g" peak_rss_mib); per step pytorch fwd $(val "$t" fwd) bwd $(val "$t" bwd) opt $(val "$t" opt), goemo fwd $(val "$g" fwd) bwd $(val "$g" bwd) opt $(val "$g" opt)" | tee -a "$log"
  fi
  if [ "$what" = all ] || [ "$what" = infer ]; then
    t=$(torch infer "$m" | tee -a "$log" | grep RESULT)
    g=$("$bench" infer "$m" | tee -a "$log" | grep RESULT)
    # The reference prints no token count; both ran the same texts, so the same tokens.
    t_tok=$(python3 -c "import sys; print(f'{int(sys.argv[1]) / float(sys.argv[2]):.0f}')" "$(val "$g" tokens)" "$(val "$t" secs)")
    echo "infer $m ex/s: pytorch $(val "$t" ex_per_s), goemo $(val "$g" ex_per_s) ($(ratio "$(val "$g" ex_per_s)" "$(val "$t" ex_per_s)")); non-padding tokens/s pytorch $t_tok, goemo $(val "$g" nonpad_tok_per_s); peak RSS MiB pytorch $(val "$t" peak_rss_mib), goemo $(val "$g" peak_rss_mib)" | tee -a "$log"
  fi
done
if [ "$what" = all ] || [ "$what" = predict ]; then
  model_out="${PREDICT_MODEL:-outputs/model}"
  if [ -f "$model_out/model.safetensors" ]; then
    texts="$out/test_texts.txt"
    cut -f1 "$GE_DATA/test.tsv" > "$texts"
    rates=()
    for run in 1 2 3; do
      line=$("$goemo" predict --stats --quiet --model "$model_out" --file "$texts" 2>&1 >/dev/null | tee -a "$log" | grep "^predicted")
      echo "predict run $run: $line"
      rates+=("$(grep -o '([0-9.]* texts/s' <<<"$line" | tr -d '(' | cut -d' ' -f1)")
    done
    echo "predict $(wc -l < "$texts") test texts, batch 64: median $(printf '%s\n' "${rates[@]}" | sort -n | sed -n 2p) texts/s (runs: ${rates[*]})" | tee -a "$log"
  else
    echo "predict: no $model_out/model.safetensors (run \`goemo run\` first, or set PREDICT_MODEL)" | tee -a "$log"
  fi
fi
if [ "$what" = all ] || [ "$what" = noop ]; then
  python3 scripts/bench_noop.py "$goemo" 30 | tee -a "$log"
fi
echo "log: $log"
