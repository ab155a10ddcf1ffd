#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (the device tool; prepare with scripts/device_wheels.sh):
#   run(command="bash scripts/device_check.sh", carry=[".whl", ".devdata"], timeout_s=540)
# 1. a venv over the image's PyTorch (system site packages) with the carried wheels, ekf-plugin among them;
# 2. the CUDA tests (tests/test_cuda.py: EKF filter, BPNN model, fast labels with threshold selection, the n2p2
#    potential, the i-PI client with --device cuda against a real i-PI), log in $OUT/cuda_tests.log;
# 3. the GPU benchmark (benchmarks/bench_gpu.py: MD step of 192 and 1536 water atoms, EKF filter) on cuda,
#    JSON in $OUT/gpu.json. Each stage has its own time limit so that the others still report.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
OUT="${OUT:-$here/device_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 EKF_PLUGIN_SHARED_DATA="$here/.devdata" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
venv=/tmp/ekf_device_venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv --system-site-packages "$venv" || exit 2
  "$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 3
fi
"$venv/bin/python" - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import torch, schnetpack, ase, ipi, ekf_plugin
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print("ase", ase.__version__, "ekf_plugin", ekf_plugin.__version__)
PY
cd /tmp  # the installed ekf-plugin, not the working tree, is what the tests import (as in CI)
timeout 300 "$venv/bin/python" -m pytest -q -p no:cacheprovider "$here/tests/test_cuda.py" -rs 2>&1 | tee "$OUT/cuda_tests.log"
echo "tests exit ${PIPESTATUS[0]}"
cd "$here"
timeout 200 "$venv/bin/python" -m benchmarks --only gpu --device cuda --json "$OUT/gpu.json" 2>&1 | tail -25
echo "benchmark exit ${PIPESTATUS[0]}"
