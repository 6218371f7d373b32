#!/usr/bin/env bash
# goemo against the references in ../shared/bench, one after the other on the same machine, data
# and batches (never at the same time: 2 cores), in one pass; prints each figure, then one
# Markdown table of ratios (goemo ÷ the fastest reference) with peak RSS.
#
#   scripts/bench.sh [tokenize|train|infer|predict|noop|all] [minilm|distilbert|both]
#
# train: PyTorch f32 and bf16 autocast (SORT=1: batches grouped by length, HF Trainer's
#   group_by_length) against goemo f32 and bf16 (packed rows, never padded), 30 steps × 32 rows.
# infer: the dev split; PyTorch f32 and bf16, and for MiniLM ONNX Runtime int8, OpenVINO int8
#   (NNCF) and CTranslate2 int8, all SORT=1 (length-sorted batches of 64), against goemo f32 and
#   int8.
# predict: `goemo predict --file` over the 5,427 test texts with the model in outputs/model (or
#   PREDICT_MODEL), three runs, median (tokenizing and scoring; model load excluded).
#
# Env: TORCH_VENV (a venv with torch, transformers, tokenizers, onnxruntime, onnxscript, openvino,
#      nncf, ctranslate2; made if missing, ~6 GB), BENCH_DIR (results and the shared batch file;
#      default bench-results/), THREADS (2), SKIP_REFS=ort,ov,ct2 (leave those out).
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
refs=../shared/bench
reference=$refs/torch_reference.py
venv="${TORCH_VENV:-$out/torch-venv}"
export MODEL_DIR="${MODEL_DIR:-models/all-MiniLM-L6-v2}" GE_DATA="${GE_DATA:-data/goemotions}"
export BENCH_BATCHES="$out/bench_batches.json" THREADS="$threads" RAYON_NUM_THREADS="$threads"

torch() {
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch transformers tokenizers safetensors numpy \
      onnxruntime onnxscript openvino nncf ctranslate2
  fi
  "$venv/bin/python" "$reference" "$@"
}
# Another reference script of ../shared/bench in the same venv (torch() made it).
ref_py() { local script=$1; shift; "$venv/bin/python" "$refs/$script" "$@"; }
skipped() { [[ ",${SKIP_REFS:-}," == *",$1,"* ]]; }
# Of several RESULT lines on stdin, the one with the highest ex_per_s.
fastest() { python3 -c 'import re, sys; print(max(sys.stdin, key=lambda l: float(re.search(r"ex_per_s=([0-9.]+)", l).group(1))), end="")'; }

# The table: one row per goemo figure, against the fastest reference of the same work.
table=()
# row FIGURE GOEMO_LINE "NAME=LINE" ...: ex/s and peak RSS from RESULT lines.
row() {
  local figure=$1 g=$2; shift 2
  local best_name="" best=0 best_rss="" others=()
  for ref in "$@"; do
    local name=${ref%%=*} line=${ref#*=} v
    v=$(val "$line" ex_per_s)
    [ -n "$v" ] || continue
    if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)" "$v" "$best"; then
      [ -n "$best_name" ] && others+=("$best_name $best")
      best_name=$name best=$v best_rss=$(val "$line" peak_rss_mib)
    else
      others+=("$name $v")
    fi
  done
  table+=("| $figure | $(val "$g" ex_per_s) ($(val "$g" peak_rss_mib) MiB) | $best_name: $best ($best_rss MiB) | **$(ratio "$(val "$g" ex_per_s)" "$best")** | $(IFS=';'; echo "${others[*]}" | sed 's/;/; /g') |")
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
    t32=$(SORT=1 torch train "$m" | tee -a "$log" | grep RESULT)
    tbf=$(SORT=1 AUTOCAST=bf16 torch train "$m" | tee -a "$log" | grep RESULT)
    g32=$("$bench" train "$m" --precision f32 | tee -a "$log" | grep RESULT)
    gbf=$("$bench" train "$m" --precision bf16 | tee -a "$log" | grep RESULT)
    for g in "$g32" "$gbf"; do
      echo "train $m ex/s: goemo $(val "$g" ex_per_s) ($(grep -o 'precision=[^ ]*' <<<"$g")); pytorch f32 $(val "$t32" ex_per_s), bf16 $(val "$tbf" ex_per_s); per step goemo fwd $(val "$g" fwd) bwd $(val "$g" bwd) opt $(val "$g" opt)" | tee -a "$log"
    done
    row "train $m, goemo f32" "$g32" "PyTorch f32=$t32" "PyTorch bf16=$tbf"
    row "train $m, goemo bf16" "$gbf" "PyTorch f32=$t32" "PyTorch bf16=$tbf"
  fi
  if [ "$what" = all ] || [ "$what" = infer ]; then
    refs_line=("PyTorch f32=$(SORT=1 torch infer "$m" | tee -a "$log" | grep RESULT)")
    refs_line+=("PyTorch bf16=$(SORT=1 AUTOCAST=bf16 torch infer "$m" | tee -a "$log" | grep RESULT)")
    if [ "$m" = minilm ]; then
      skipped ort || refs_line+=("ONNX Runtime int8=$(SORT=1 ref_py ort_reference.py int8 | tee -a "$log" | grep RESULT)")
      # ov_reference.py int8 prints two lines (the rest of the graph in f32, in bf16): the faster.
      skipped ov || refs_line+=("OpenVINO int8=$(SORT=1 ref_py ov_reference.py int8 | tee -a "$log" | grep RESULT | fastest)")
      skipped ct2 || refs_line+=("CTranslate2 int8=$(SORT=1 ref_py ct2_reference.py int8 | tee -a "$log" | grep RESULT | grep -v error= | head -1)")
    fi
    g32=$("$bench" infer "$m" --precision f32 | tee -a "$log" | grep RESULT)
    g8=$("$bench" infer "$m" --precision int8 | tee -a "$log" | grep RESULT)
    for r in "${refs_line[@]}"; do echo "infer $m ${r%%=*}: $(val "${r#*=}" ex_per_s) ex/s, peak RSS $(val "${r#*=}" peak_rss_mib) MiB" | tee -a "$log"; done
    echo "infer $m goemo: f32 $(val "$g32" ex_per_s) ex/s ($(val "$g32" peak_rss_mib) MiB), int8 $(val "$g8" ex_per_s) ex/s ($(val "$g8" peak_rss_mib) MiB)" | tee -a "$log"
    row "infer $m dev split, goemo f32" "$g32" "${refs_line[@]}"
    row "infer $m dev split, goemo int8" "$g8" "${refs_line[@]}"
  fi
done
if [ "${#table[@]}" -gt 0 ]; then
  {
    echo
    echo "| figure ($threads threads, one pass) | goemo ex/s (peak RSS) | fastest reference (peak RSS) | goemo ÷ fastest | other references, ex/s |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${table[@]}"
  } | tee -a "$log"
fi
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
