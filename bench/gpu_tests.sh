#!/usr/bin/env bash
# The GPU tests (tests/test_gpu.py: bf16 step vs fp32, NCCL DDP on 2 ranks, SDPA vs the reference attention,
# CUDA-graph sampling vs eager) in one command, on a machine with CUDA. bench/README.md, "GPU tests", says
# what each checks, which wheels a bare GPU image needs, and where the measured differences go.
#
#   bash bench/gpu_tests.sh            # the python3 on PATH; PYTHON=/path/to/python overrides it
#   bash bench/gpu_tests.sh -k sdpa    # extra arguments go to pytest
#
# Wheels in .whl/ (if any) are installed into /tmp/draftray-site first and put ahead on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/draftray-site .whl/*.whl
    export PYTHONPATH="/tmp/draftray-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch" 2> /dev/null; then
    echo "bench/gpu_tests.sh: $PY cannot import torch; set PYTHON to the interpreter that has torch with CUDA." >&2
    exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu_tests.sh: $PY sees no CUDA device; the GPU tests would all skip. Run this on a GPU machine." >&2
    exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0))"

# -s prints each comparison's measured difference (the numbers to record in docs/benchmarks.md).
exec "$PY" -m pytest tests/test_gpu.py -m gpu -q -rs -s -p no:cacheprovider "$@"
