#!/usr/bin/env bash
# One-shot GPU benchmark, a few minutes on one CUDA GPU:
#   h2d            host-to-device copy floor (pinned and pageable buffer of the checkpoint's size)
#   load_cuda      load to cuda:0: bigload vs accelerate vs transformers vs safetensors/raw floors
#   generate_cuda  half the bytes on cuda:0, the rest in CPU RAM: forward + 16 greedy tokens,
#                  bigload prefetch on/off vs accelerate vs transformers, all-on-GPU baselines
# Writes RESULTS-gpu.md, the raw results (.jsonl), the log and nvidia-smi's view to $OUT if set,
# else to benchmarks/_work/gpu/. Knobs: SIZE (100MB|1GB|3GB, default 1GB), REPS (default 2),
# PYTHON (default python3), SCENARIOS (default h2d,load_cuda,generate_cuda).
# Needs torch with CUDA, transformers, accelerate, safetensors; bigload is taken from src/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/_work/gpu}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{ nvidia-smi || true; } >"$out/nvidia-smi.txt" 2>&1
"$py" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: torch sees no CUDA device; nothing to measure")
import accelerate, safetensors, transformers  # noqa: E401,F401  fail early when one is missing
print("gpu.sh:", torch.cuda.get_device_name(0), "torch", torch.__version__,
      "transformers", transformers.__version__, "accelerate", accelerate.__version__)
EOF

start=$(date +%s)
status=0
"$py" benchmarks/run.py --size "${SIZE:-1GB}" --reps "${REPS:-2}" \
    --scenarios "${SCENARIOS:-h2d,load_cuda,generate_cuda}" --timeout 300 \
    --out "$out/RESULTS-gpu.md" 2>&1 | tee "$out/gpu.log" || status=$?
latest=$(ls -t benchmarks/_work/results/*.jsonl 2>/dev/null | head -n 1 || true)
[ -n "$latest" ] && cp "$latest" "$out/results-gpu.jsonl"
echo "gpu.sh: done in $(( $(date +%s) - start )) s, exit $status; results in $out" | tee -a "$out/gpu.log"
exit "$status"
