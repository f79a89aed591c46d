#!/usr/bin/env bash
# bench/gpu_check.sh: on a machine with an NVIDIA GPU, serve with the CUDA execution provider
# and run the `kvcache`, `embed` and `generate` benchmarks on it, printing their JSON (in at most
# 10 minutes).
#
#   bash bench/gpu_check.sh            # GPU 0
#   BENCH_GPU=1 bash bench/gpu_check.sh
#   BENCH_PYTHON=/opt/venv/bin/python bash bench/gpu_check.sh   # an interpreter set up already
#
# Steps: 1. nvidia-smi must work (else exit 3: no GPU here). 2. use .venv (create it and
# `pip install -e .` when missing), or the interpreter BENCH_PYTHON names (it must import the
# project, from PYTHONPATH or an install, and onnxruntime-gpu: nothing is installed into it).
# 3. when .venv's onnxruntime has no CUDAExecutionProvider, replace it with onnxruntime-gpu
# (pip; needs the package index, or a wheel via PIP_FIND_LINKS). 4. print the
# providers ONNX Runtime has and the ones a worker's session actually gets (the worker's own
# code path: workers.runner.select_providers + Runner; ORT falls back to the CPU provider when
# CUDA or cuDNN libraries cannot be loaded, so "available" is not enough). 5. run
# `python -m bench kvcache` (what the engine's host round trip of the KV cache costs per decode
# step on the GPU) and `python -m bench generate` on a GPT-2-small-shaped decoder built in a
# temporary directory, then `python -m bench embed` (MiniLM shape, demo), with BENCH_GPU set, so
# every worker is `banter worker --gpu N`; each JSON goes to stdout and to $OUT_DIR (default
# gpu-check-out/), and the providers each worker's model actually ran on are printed from the
# JSON / logs. Each scenario has its own time limit (KVCACHE_TIMEOUT_S 60, GENERATE_TIMEOUT_S
# 330, EMBED_TIMEOUT_S 120, EMBED_DEMO_TIMEOUT_S 90). GPU_CHECK_SCENARIOS picks which run
# (default "kvcache generate embed-minilm embed-demo"); GENERATE_ROUNDS (3), GENERATE_REPEATS (4),
# GENERATE_BASELINES (static,raw_ort) and GENERATE_VARIANTS (space-separated NAME:VAR=VALUE, default
# "tf32:BANTER_CUDA_TF32=on separate_prefill:BANTER_PREFILL_MERGE=off ort_threads_1:BANTER_ORT_THREADS=1")
# shape the `generate` run,
# whose every worker first runs one
# round of the workload untimed (--warm-up-rounds 1: a GPU's first-time costs stay out of the
# timing) and whose raw loops run once (--raw-repeats 1).
# Exit codes: 0 done on CUDA, 2 an unknown scenario in GPU_CHECK_SCENARIOS or a GENERATE_ROUNDS or
# GENERATE_REPEATS that is not a positive integer (nothing run), 3 no GPU, 4 no CUDA provider could be set up, 5 the worker's
# session did not get CUDA, 1 a benchmark failed.
set -euo pipefail

cd "$(dirname "$0")/.."
GPU="${BENCH_GPU:-0}"
OUT_DIR="${OUT_DIR:-gpu-check-out}"
started=$(date +%s)

say() { echo "gpu_check: $*" >&2; }

scenarios=" ${GPU_CHECK_SCENARIOS:-kvcache generate embed-minilm embed-demo} "
for s in $scenarios; do
  case "$s" in
    kvcache|generate|embed-minilm|embed-demo) ;;
    *) say "GPU_CHECK_SCENARIOS: unknown scenario '$s' (kvcache, generate, embed-minilm, embed-demo)"; exit 2 ;;
  esac
done
wanted() { [[ "$scenarios" == *" $1 "* ]]; }
for count in GENERATE_ROUNDS GENERATE_REPEATS; do
  if [ -n "${!count:-}" ] && ! [[ "${!count}" =~ ^[1-9][0-9]{0,3}$ ]]; then
    say "$count must be a positive integer (at most 9999), got '${!count}' (nothing was run)"
    exit 2
  fi
done

if ! command -v nvidia-smi >/dev/null 2>&1; then
  say "nvidia-smi not found: this check needs a machine with an NVIDIA GPU and its driver" \
      "(nothing was run). On a CPU machine use 'python -m bench embed' / 'generate' instead."
  exit 3
fi
if ! nvidia-smi -L >&2; then
  say "nvidia-smi failed: no usable NVIDIA GPU or driver (nothing was run)"
  exit 3
fi
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv >&2 || true

PY="${BENCH_PYTHON:-.venv/bin/python}"
if [ -z "${BENCH_PYTHON:-}" ] && [ ! -x "$PY" ]; then
  say "creating .venv and installing the project"
  python3 -m venv .venv
  "$PY" -m pip install -q -e '.[test]'
fi

providers() { "$PY" -c 'import onnxruntime as o; print(",".join(o.get_available_providers()))'; }

# CUDA/cuDNN from pip (onnxruntime-gpu[cuda,cudnn]) live in site-packages/nvidia/*/lib: put them
# on the loader path of every process started below (workers included).
nvidia_libs() {
  "$PY" - <<'EOF'
import glob, os, site
dirs = []
for base in site.getsitepackages():
    dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib")))
print(":".join(dirs))
EOF
}

available="$(providers)"
if [[ "$available" != *CUDAExecutionProvider* ]] && [ -z "${BENCH_PYTHON:-}" ]; then
  say "onnxruntime has no CUDA provider ($available): installing onnxruntime-gpu"
  "$PY" -m pip uninstall -q -y onnxruntime onnxruntime-gpu || true
  if ! "$PY" -m pip install -q 'onnxruntime-gpu[cuda,cudnn]' && ! "$PY" -m pip install -q onnxruntime-gpu; then
    say "pip could not install onnxruntime-gpu (no package index? set PIP_FIND_LINKS to a wheel directory)"
    exit 4
  fi
  available="$(providers)"
fi
libs="$(nvidia_libs)"
if [ -n "$libs" ]; then
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
echo "onnxruntime providers available: $available"
if [[ "$available" != *CUDAExecutionProvider* ]]; then
  say "this onnxruntime build still has no CUDAExecutionProvider"
  exit 4
fi

# What a worker's session actually gets, through the worker's own code path.
session_providers="$(CUDA_VISIBLE_DEVICES="$GPU" "$PY" - <<'EOF'
import tempfile
from pathlib import Path
from banter.demo import DEMO_EMBED, build_demo
from registry.artifacts import sha256_file
from workers.runner import ModelSpec, Runner, select_providers

root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
model = build_demo(root)[DEMO_EMBED] / "model.onnx"
spec = ModelSpec(DEMO_EMBED, 1, "embed", model, model.parent / "tokenizer.json", sha256_file(model))
print(",".join(Runner(spec, select_providers(use_gpu=True)).providers))
EOF
)"
echo "worker session providers (GPU $GPU): $session_providers"
if [[ "$session_providers" != CUDAExecutionProvider* ]]; then
  say "a worker session fell back to '$session_providers': CUDA or cuDNN libraries did not load" \
      "(see the onnxruntime error above; onnxruntime-gpu needs the CUDA and cuDNN versions its build names: 1.31 wants CUDA 13 and cuDNN 9)"
  exit 5
fi

mkdir -p "$OUT_DIR"
export BENCH_GPU="$GPU"
status=0
# each scenario's time limit (seconds); the four together take at most 10 minutes
run_scenario() {
  local label="$1" limit="$2" name="$3"; shift 3
  wanted "$label" || return 0
  say "running: python -m bench $name $* (GPU $GPU, at most ${limit}s)"
  if timeout "$limit" "$PY" -m bench --log-level INFO "$name" "$@" \
      >"$OUT_DIR/$label.json" 2>"$OUT_DIR/$label.log"; then
    cat "$OUT_DIR/$label.json"
    grep -o 'worker [^ ]* ran .*' "$OUT_DIR/$label.log" >&2 || true
  else
    say "$label failed (exit $?); last log lines:"
    tail -n 30 "$OUT_DIR/$label.log" >&2
    status=1
  fi
}
# A GPT-2-small-shaped decoder (12 layers, 768 wide, random weights; ~500 MB), built here in a
# temporary directory: `kvcache` (the KV cache's host round trip per decode step) and
# `generate` (continuous vs static batching vs raw ORT, plus the TF32 variant) run on it.
model_tmp="$(mktemp -d)"
trap 'rm -rf "$model_tmp"' EXIT
gpt2="$model_tmp/gpt2-small-random"
if ! wanted kvcache && ! wanted generate; then
  :
elif "$PY" -m banter.cli models import --random-gpt2-small "$gpt2" >&2; then
  run_scenario kvcache "${KVCACHE_TIMEOUT_S:-60}" kvcache --gpu "$GPU" --model-dir "$gpt2" --repeats 3
  # continuous against static batching, and by default the same with TF32 matrix products
  # (BANTER_CUDA_TF32, off by default: its speed, and whether each job's tokens still equal
  # what it makes alone, `correctness.variant_tf32`), with joining prompts in a prefill pass
  # of their own (BANTER_PREFILL_MERGE=off; a GPU merges them into the decode pass), and with
  # one ONNX Runtime intra-op thread per session (BANTER_ORT_THREADS=1), interleaved
  variants=()
  for v in ${GENERATE_VARIANTS-tf32:BANTER_CUDA_TF32=on separate_prefill:BANTER_PREFILL_MERGE=off ort_threads_1:BANTER_ORT_THREADS=1}; do
    variants+=(--variant "$v")
  done
  run_scenario generate "${GENERATE_TIMEOUT_S:-330}" generate --gpu "$GPU" --model-dir "$gpt2" \
    --rounds "${GENERATE_ROUNDS:-3}" --repeats "${GENERATE_REPEATS:-4}" --baselines "${GENERATE_BASELINES:-static,raw_ort}" \
    --warm-up-rounds 1 --raw-repeats 1 "${variants[@]}"
else
  say "could not build the GPT-2-small-shaped decoder; kvcache and generate skipped"
  status=1
fi
run_scenario embed-minilm "${EMBED_TIMEOUT_S:-120}" embed --gpu "$GPU" --shape minilm --sentences 4000 --repeats 2
run_scenario embed-demo "${EMBED_DEMO_TIMEOUT_S:-90}" embed --gpu "$GPU" --sentences 4000 --repeats 1 \
  --baselines raw_ort
say "done in $(( $(date +%s) - started ))s; JSON in $OUT_DIR/"
exit "$status"
