#!/usr/bin/env bash
# The MaskEmbed step on one accelerator, in one command (~8 minutes): a JSON line per case on stdout, the logs in
# ${OUT:-/tmp/device_bench}. Cases: ViT-B/16 @ 224, batch 256, bf16, with XLA's attention and with the fused
# (cuDNN) one, then a profiled step (time by teacher / student / decoder / optimizer and by matmul / attention /
# elementwise); So400m/14 @ 384 on one device (fsdp=1) at the largest batch of 64, 32, 16 that fits; the demo
# ViT at batch 1024; and, where torch with CUDA is installed, the reference's PyTorch step on the same device.
#   bash scripts/device_bench.sh            # docs/performance.md, "GPU (H100)", reads these lines
#   SMOKE=1 bash scripts/device_bench.sh    # the same cases at the configs' :smoke sizes: checks the script on CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device_bench}"
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # peak memory is then what the step uses, not the allocator's pool

python - <<'PY'
import json, jax, flax, optax
print(json.dumps({"case": "environment", "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                  "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind}))
PY

bench() {  # bench CASE TIMEOUT ARGS...: one JSON line, labelled
  local case="$1" limit="$2"; shift 2
  if timeout "$limit" python -m lalign.bench "$@" > "$OUT/$case.json" 2> "$OUT/$case.log"; then
    python -c "import json,sys; r=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); r.pop('flops_per_image_parts', None); print(json.dumps({'case': sys.argv[2], **r}))" "$OUT/$case.json" "$case"
    return 0
  fi
  echo "{\"case\": \"$case\", \"failed\": true, \"log_tail\": $(tail -n 3 "$OUT/$case.log" | python -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"
  return 1
}

SIZE="" B16_BATCH=256 SO400M_BATCHES="64 32 16" DEMO_BATCH=1024
if [ -n "${SMOKE:-}" ]; then SIZE=":smoke" B16_BATCH=8 SO400M_BATCHES="8" DEMO_BATCH=8; fi
B16=(--config=configs/siglip_b16.py$SIZE --config.batch_size=$B16_BATCH --config.mesh.fsdp=1 --steps=10 --warmup=3)
bench b16_xla 150 "${B16[@]}" --config.model.attention_impl=xla
bench b16_fused 150 "${B16[@]}" --config.model.attention_impl=fused
bench b16_profile 150 "${B16[@]}" --config.model.attention_impl=xla --steps=3 --profile="$OUT/profile_b16"
for batch in $SO400M_BATCHES; do
  bench "so400m_384_batch$batch" 180 --config=configs/siglip_so400m.py$SIZE --config.batch_size=$batch \
    --config.mesh.fsdp=1 --steps=5 --warmup=2 && break
done
bench "demo_batch$DEMO_BATCH" 90 --config=configs/demo.py$SIZE --config.batch_size=$DEMO_BATCH --steps=20

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  timeout 150 python scripts/bench_torch_reference.py --model b16 --batch 256 --device cuda --bf16 --steps 10 \
    2> "$OUT/torch_b16.log" | python -c "import json,sys; r=json.loads(sys.stdin.read()); r.pop('flops_per_image_parts', None); print(json.dumps({'case': 'torch_reference_b16', **r}))"
else
  echo '{"case": "torch_reference_b16", "skipped": "torch with CUDA is not installed on this machine"}'
fi
