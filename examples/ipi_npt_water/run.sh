#!/usr/bin/env bash
# One command: NPT water with i-PI and an ekf-plugin model, then a density plot.
#   ./run.sh [MODEL] [STEPS]
# MODEL: spktrain best_model, an exported model, or an n2p2 potential directory
#        (default: the RPBE-D3 n2p2 water potential in ../shared/data beside the checkout).
# Environment: DEVICE (cpu|cuda, default cpu), THREADS (torch threads, default 1), PYTHON,
#              RUN_DIR (default ./run) and SOCKET_NAME (default ekf_npt_water) for several runs at once.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
MODEL="${1:-$REPO/../shared/data/n2p2-h2o-potentials/H2O_RPBE-D3}"
STEPS="${2:-2000}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
NAME="${SOCKET_NAME:-ekf_npt_water}"
SOCKET="/tmp/ipi_$NAME"
RUN="${RUN_DIR:-$HERE/run}"

mkdir -p "$RUN"
cd "$RUN"
[ -f init.xyz ] || "$PYTHON" "$HERE/make_init.py" --out init.xyz
sed -e "s|<total_steps>.*</total_steps>|<total_steps>$STEPS</total_steps>|" \
    -e "s|<address>ekf_npt_water</address>|<address>$NAME</address>|" "$HERE/input.xml" > input.xml
rm -f RESTART EXIT npt.out npt.pos_0.xyz npt.chk
# shellcheck source=../ipi_npt_water/start_ipi.sh
source "$HERE/start_ipi.sh"
start_ipi    # i-PI in the background, its socket ready, stopped on exit

echo "running $STEPS steps with $MODEL (i-PI log: $RUN/ipi.log)"
SECONDS=0
set +e
"$BIN/ekf-plugin" ipi --model "$MODEL" --template init.xyz --unix "$NAME" \
  --device "${DEVICE:-cpu}" --threads "${THREADS:-1}"
RC=$?
set -e
if [ $RC -ne 0 ]; then
  echo "client failed with exit code $RC; stopping i-PI (SIGTERM leaves a restartable RESTART file)"
  exit $RC
fi
wait "$IPI"
trap - EXIT
echo "done: $STEPS steps in ${SECONDS} s"
"$PYTHON" "$HERE/plot_density.py" npt.out --out density.png
