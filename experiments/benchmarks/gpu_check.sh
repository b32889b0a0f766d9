#!/usr/bin/env bash
# The GPU checks of the "speed at scale" work, in one run of under 8 minutes on one H100 / H200:
#   1. cuDNN flash attention vs XLA attention (tests/test_nn.py, masks, causal and GQA included)
#   2. bf16 SigLIP-B/16 train step (the full recipe, 224 px, text 64) at growing batches up to the
#      largest that fits: steps/s, examples/s, TFLOP/s and MFU (vlm.train.PEAK_FLOPS)
#   3. a LLaVA-1.5-style step (CLIP-L/14 at 336 px + a ~1B Llama-style LM, 2048 tokens): tokens/s
#   4. greedy decoding with the KV cache: tokens/s (experiments/benchmarks/bench_decoding.py)
# Each prints JSON lines; everything also lands in $OUT (default /tmp/gpu_check).
#
# The GPU machines here have jax, flax, optax, orbax, transformers and torch but not grain or
# ml_collections, and cannot download. Fetch those wheels on a machine with PyPI first, from the
# repo root (the folder .whl is ignored by git through .git/info/exclude):
#
#   experiments/benchmarks/gpu_check.sh wheels
#
# then run there, carrying .whl:   experiments/benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for spec in grain==0.2.18 array-record==0.8.6 ml_collections==1.1.0 portpicker==1.6.0 tensorflow-datasets==4.9.10 \
              dm-tree promise simple-parsing docstring-parser toml wrapt termcolor googleapis-common-protos \
              tensorflow-metadata immutabledict; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$spec" || echo "could not fetch $spec"
  done
  ls .whl
  exit 0
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=2
DATA="--config.data.data_dir=/tmp/vlm_gpu_data --config.data.builder.num_train=2048 --config.data.builder.num_validation=64 --config.data.builder.num_test=64"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

echo "== 1. cuDNN vs XLA attention"
timeout 120 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_nn.py -k "cudnn or attention_impl" 2>&1 \
  | tail -5 | tee "$OUT/attention.txt"

echo "== 2. bf16 SigLIP-B/16 train step, batch sweep"
for b in 256 512 1024 2048; do
  timeout 150 $PY experiments/benchmarks/bench_train.py --config=configs/siglip_b16.py --config.batch_size=$b \
    $DATA --steps=10 --rounds=3 2>>"$OUT/siglip.err" | tee -a "$OUT/siglip.jsonl" || { echo "batch $b: failed (OOM?)"; break; }
done

echo "== 3. LLaVA-style step: CLIP-L/14 336 px + ~1B LM (16 x 2048, GQA-free Llama layout), 2048 tokens"
LM="--config.model.lm_config.width=2048 --config.model.lm_config.depth=16 --config.model.lm_config.num_heads=16 --config.model.lm_config.mlp_dim=5632"
for b in 8 16; do
  timeout 200 $PY experiments/benchmarks/bench_train.py --config=configs/llava_stage2.py --config.batch_size=$b $LM \
    $DATA --steps=5 --rounds=2 2>>"$OUT/llava.err" | tee -a "$OUT/llava.jsonl" || { echo "batch $b: failed"; break; }
done

echo "== 4. greedy decoding with the KV cache"
timeout 120 $PY experiments/benchmarks/bench_decoding.py --batch 256 --max_len 64 --repeats 3 2>>"$OUT/decoding.err" \
  | tee "$OUT/decoding.jsonl"
echo "done: $OUT"
