#!/usr/bin/env bash
# Prepare, on this machine, what scripts/device_check.sh needs on a lent GPU machine, where nothing can be
# fetched: wheels for its Python 3.12 of the packages its image lacks plus ekf-plugin itself (.whl/), and the
# shared data its checks read (.devdata/). Both are ignored by git (.git/info/exclude) and travel with the
# device tool's `carry: [".whl", ".devdata"]` (about 25 MiB of the 64 MiB allowed).
#   bash scripts/device_wheels.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
py="${PYTHON:-$here/.venv/bin/python}"
for d in /.whl/ /.devdata/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
rm -rf .whl .devdata && mkdir -p .whl .devdata
# the versions this project tests (scripts/install.sh); the device image has torch, numpy, scipy, h5py,
# pytorch-lightning, torchmetrics, rich, tqdm, pyyaml, sympy, pluggy, pytest (its KINDS.md)
pkgs=(ase==3.29.0 schnetpack==2.1.1 hydra-core==1.3.8 omegaconf==2.3.1 hydra-colorlog==1.2.0 colorlog==6.12.0
      matscipy==1.3.1 ipi==3.3.1 dirsync==2.2.6 fasteners==0.20 tensorboardX==2.6.5 torch-ema==0.3)
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl "${pkgs[@]}"
"$py" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3   # pure Python, published as sdist only
"$py" -m pip wheel -q --no-deps -w .whl "$here"                          # ekf-plugin (console scripts, entry points)
shared="${EKF_PLUGIN_SHARED_DATA:-$here/../shared/data}"
mkdir -p .devdata/n2p2-h2o-potentials
cp -r "$shared/n2p2-h2o-potentials/H2O_RPBE-D3" .devdata/n2p2-h2o-potentials/
ls .whl
du -sh .whl .devdata
