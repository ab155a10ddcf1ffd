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
if [ -S "$SOCKET" ] || [ -e "$SOCKET" ]; then
  echo "removing stale socket $SOCKET"; rm -f "$SOCKET"
fi

"$BIN/i-pi" input.xml > ipi.log 2>&1 &
IPI=$!
cleanup() { if kill -0 "$IPI" 2>/dev/null; then kill -TERM "$IPI"; wait "$IPI" || true; fi; rm -f "$SOCKET"; }
trap cleanup EXIT

for _ in $(seq 1 600); do               # wait up to 60 s for i-PI's socket
  [ -S "$SOCKET" ] && break
  kill -0 "$IPI" 2>/dev/null || { echo "i-PI died, see $RUN/ipi.log"; tail -20 ipi.log; exit 1; }
  sleep 0.1
done
[ -S "$SOCKET" ] || { echo "i-PI did not create $SOCKET"; exit 1; }

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
