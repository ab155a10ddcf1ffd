#!/usr/bin/env bash
# One command: path-integral NPT water (8 beads) with i-PI and an ekf-plugin model, batched requests.
#   ./run.sh [MODEL] [STEPS]
# MODEL: spktrain best_model, an exported model, or an n2p2 potential directory
#        (default: the committed revPBE0-D3 BPNN ../water_revpbe0/models/ekf_lr1e-3_s0.pt).
# Environment: BATCH (structures per i-PI request, default 8 = all beads; 1 = one bead per request),
#              DEVICE (cpu|cuda, default cpu), THREADS (torch threads, default 1), PYTHON,
#              RUN_DIR (default ./run) and SOCKET_NAME (default ekf_pimd_water) for several runs at once.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
MODEL="${1:-$REPO/examples/water_revpbe0/models/ekf_lr1e-3_s0.pt}"
STEPS="${2:-2000}"
BATCH="${BATCH:-8}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
NAME="${SOCKET_NAME:-ekf_pimd_water}"
SOCKET="/tmp/ipi_$NAME"
RUN="${RUN_DIR:-$HERE/run}"

[ -e "$MODEL" ] || { echo "no model at $MODEL" >&2; exit 2; }
MODEL="$(realpath "$MODEL")"   # before cd: a relative MODEL is relative to where the command was given
mkdir -p "$RUN"
cd "$RUN"
[ -f init.xyz ] || "$PYTHON" "$HERE/../ipi_npt_water/make_init.py" --out init.xyz
sed -e "s|<total_steps>.*</total_steps>|<total_steps>$STEPS</total_steps>|" \
    -e "s|<batch_size>.*</batch_size>|<batch_size>$BATCH</batch_size>|" \
    -e "s|<address>ekf_pimd_water</address>|<address>$NAME</address>|" "$HERE/input.xml" > input.xml
rm -f RESTART EXIT pimd.out pimd.pos_*.xyz pimd.chk ipi.log
# shellcheck source=../ipi_npt_water/start_ipi.sh
source "$HERE/../ipi_npt_water/start_ipi.sh"
start_ipi    # i-PI in the background, its socket ready, stopped on exit

echo "running $STEPS path-integral steps (8 beads, batch_size $BATCH) with $MODEL (i-PI log: $RUN/ipi.log)"
SECONDS=0
set +e
"$BIN/ekf-plugin" ipi --model "$MODEL" --template init.xyz --unix "$NAME" \
  --device "${DEVICE:-cpu}" --threads "${THREADS:-1}" 2>&1 | tee client.log
RC=${PIPESTATUS[0]}
set -e
if [ $RC -ne 0 ]; then
  echo "client failed with exit code $RC; stopping i-PI (SIGTERM leaves a restartable RESTART file)"
  exit $RC
fi
wait "$IPI"
trap - EXIT
# the client's log has the time per request after the first (start-up and first call excluded)
"$PYTHON" - "$STEPS" "$BATCH" "$SECONDS" <<'PY'
import re, sys
steps, batch, total = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
log = open("client.log").read()
# batched: "... ms per evaluated structure"; one bead per request: "(... ms per call"
m = re.search(r"([\d.]+) ms per evaluated structure", log) or re.search(r"\(([\d.]+) ms per call,", log)
print(f"done: {steps} steps in {total} s (start-up included)")
if m:
    per_bead = float(m.group(1)) / 1e3  # s per bead evaluation, i-PI's and the socket's share included
    print(f"per step: {8 * per_bead:.3f} s, per bead: {per_bead:.3f} s (batch_size {batch}, after the first request)")
PY
