#!/usr/bin/env bash
# The device check of issue #8: bench/delta_ops.py at 7B shape on a CUDA machine, in one command
# that fits in 8 minutes (bench/README.md, "On a GPU").
#
#   bash bench/gpu_check.sh                      # base + 2 fine-tuned 6.7B models, bf16
#   bash bench/gpu_check.sh --repeat 2           # extra arguments go to delta_ops.py (last wins)
#   GPU_CHECK_ON_CPU=1 bash bench/gpu_check.sh --params 2e7 --hidden 128 --layers 2
#                                                # a dry run of the script itself, without a GPU
#
# Environment: PYTHON (default python3: a Python whose torch has CUDA, with transformers and
# safetensors; mergekit's rows run when it imports mergekit), WORKDIR (default /tmp/dcbench-gpu;
# needs ~55 GB free: three 13.5 GB models and one output at a time), BUDGET_S (default 400: no
# operation starts after that many seconds, set generation included), LIMIT_S (default 460: an
# operation still running then is stopped and reported, so the check ends within 8 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORKDIR=${WORKDIR:-/tmp/dcbench-gpu}
BUDGET_S=${BUDGET_S:-400}
LIMIT_S=${LIMIT_S:-460}
DEVICE=cuda
[[ "${GPU_CHECK_ON_CPU:-0}" == 1 ]] && DEVICE=cpu

"$PY" - "$DEVICE" <<'EOF'
import sys

import torch

if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda}); "
             "run it on a GPU machine, or set GPU_CHECK_ON_CPU=1 for a dry run")
where = torch.cuda.get_device_name(0) if sys.argv[1] == "cuda" else "the CPU (dry run)"
print(f"gpu_check: torch {torch.__version__} on {where}", flush=True)
EOF

ops=floor-1,floor-N,dare,ta,ties
if "$PY" -c "import mergekit" 2>/dev/null; then
    ops+=,mk-dare,mk-ta,mk-ties
else
    echo "gpu_check: mergekit is not installed for $PY: its rows are left out (bench/README.md says how to carry it)"
fi
mkdir -p "$WORKDIR"
exec "$PY" bench/delta_ops.py --params 7e9 --models 2 --shard-gb 5 --device "$DEVICE" --threads 4 \
    --workdir "$WORKDIR" --ops "$ops" --time-budget "$BUDGET_S" --time-limit "$LIMIT_S" "$@"
