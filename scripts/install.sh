#!/usr/bin/env bash
# Install ekf-plugin and its tested host stack (CPU PyTorch, SchNetPack 2.1.1, ASE, i-PI) into a virtual env.
#
#   bash scripts/install.sh            # creates ./.venv (or reuses it)
#   VENV=/path/to/env bash scripts/install.sh
#
# Why SchNetPack goes in with --no-deps: 2.1.1 declares sympy<=1.12 but torch 2.13 needs sympy>=1.13.3,
# so pip cannot resolve them together; we install SchNetPack alone plus its real dependencies.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$here/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
c="$here/requirements/constraints-cpu.txt"

if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating virtual env $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U "pip>=24"

if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(torch.__version__ != "2.13.0+cpu")' 2>/dev/null; then
  echo "[install] torch 2.13.0 (CPU build)"
  # A local wheel (pip find-links) is used when present; otherwise the official CPU index.
  "${pip[@]}" install -c "$c" torch==2.13.0+cpu 2>/dev/null \
    || "${pip[@]}" install -c "$c" --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu
fi
echo "[install] SchNetPack 2.1.1 (--no-deps) and its real dependencies"
"${pip[@]}" install --no-deps schnetpack==2.1.1
"${pip[@]}" install -c "$c" -r "$here/requirements/schnetpack-deps.txt"
echo "[install] ekf-plugin (editable) with i-PI, pluggy and the test tools"
"${pip[@]}" install -c "$c" -e "$here[test]"
if "$venv/bin/python" -m pip list 2>/dev/null | grep -Eiq '^(nvidia|triton)'; then
  echo "[install] ERROR: CUDA packages were pulled in" >&2; exit 1
fi
echo "[install] done: $("$venv/bin/python" -c 'import torch, schnetpack, ase, ipi, pluggy; print("torch", torch.__version__, "| schnetpack", schnetpack.__version__ if hasattr(schnetpack, "__version__") else "2.1.1", "| ase", ase.__version__, "| pluggy", pluggy.__version__)')"
