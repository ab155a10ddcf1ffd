#!/usr/bin/env bash
# One command: NPT water with i-PI and an ekf-plugin model, then a density plot.
#   ./run.sh [MODEL] [STEPS]
# MODEL: spktrain best_model, an exported model, or an n2p2 potential directory
#        (default: the RPBE-D3 n2p2 water potential in ../shared/data beside the checkout).
# Environment: DEVICE (cpu|cuda, default cpu), THREADS (torch threads, default 1), PYTHON,
#              RUN_DIR (default ./run) and SOCKET_NAME (default ekf_npt_water) for several runs at once,
#              INPUT (i-PI input template, default ./input.xml), FRESH=1 (start over instead of resuming).
# A run that was stopped (killed, a crash, the machine went down) resumes when the same command is given again:
# from i-PI's newest checkpoint in RUN_DIR, if it was started with the same MODEL (path and content) and STEPS.
set -euo pipefail
{ # read whole before it runs: editing this file during a run cannot change the run
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
MODEL="${1:-$REPO/../shared/data/n2p2-h2o-potentials/H2O_RPBE-D3}"
STEPS="${2:-2000}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
NAME="${SOCKET_NAME:-ekf_npt_water}"
SOCKET="/tmp/ipi_$NAME"
RUN="${RUN_DIR:-$HERE/run}"
INPUT="$(cd "$(dirname "${INPUT:-$HERE/input.xml}")" && pwd)/$(basename "${INPUT:-input.xml}")"

[ -e "$MODEL" ] || { echo "no model at $MODEL" >&2; exit 2; }
MODEL="$(realpath "$MODEL")"   # before cd: a relative MODEL is relative to where the command was given
mkdir -p "$RUN"
cd "$RUN"
[ -f init.xyz ] || "$PYTHON" "$HERE/make_init.py" --out init.xyz
model_sha() {   # the model's content (a file, or every file of an n2p2 directory): a new model at the same path
  if [ -d "$1" ]; then (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
  else sha256sum "$1" | cut -c1-16; fi   # is another run, not a continuation
}
this_run="model=$(realpath -m "$MODEL") sha256=$(model_sha "$MODEL") steps=$STEPS input=$INPUT"   # what a resumed run must match
resume=""
if [ -z "${FRESH:-}" ] && [ -f run.args ] && [ "$(cat run.args)" != "$this_run" ]; then
  echo "starting over: $RUN held a run of another model, length or input ($(cat run.args))"
fi
if [ -z "${FRESH:-}" ] && [ -f run.args ] && [ "$(cat run.args)" == "$this_run" ]; then
  if [ -f RESTART ] && [ "$("$PYTHON" -c "from ekf_plugin.md.runner import checkpoint_step as c; print(c('RESTART'))" 2>/dev/null)" == "$STEPS" ]; then
    echo "already done: $RUN has all $STEPS steps of this run (FRESH=1 runs it again)"
    "$PYTHON" "$HERE/plot_density.py" npt.out --out density.png
    exit 0
  fi
  resume=$("$PYTHON" -c "import sys; from ekf_plugin.md.runner import resume_checkpoint as r; p = r('.', int(sys.argv[1])); print(p or '')" "$STEPS")
fi
if [ -n "$resume" ]; then   # i-PI continues from its checkpoint and appends to its outputs
  step=$(sed -n 's|.*<step>[[:space:]]*\([0-9]*\)[[:space:]]*</step>.*|\1|p' "$resume")
  echo "resuming from $RUN/$resume (step $step of $STEPS; FRESH=1 starts over)"
  sed -e "s|<address>.*</address>|<address>$NAME</address>|" "$resume" > resume.xml
  IPI_INPUT=resume.xml
  calls=$((STEPS - step + 1))
else
  sed -e "s|<total_steps>.*</total_steps>|<total_steps>$STEPS</total_steps>|" \
      -e "s|<address>ekf_npt_water</address>|<address>$NAME</address>|" "$INPUT" > input.xml
  rm -f RESTART EXIT npt.out npt.pos_0.xyz npt.restart npt.restart_* npt.chk resume.xml ipi.log
  echo "$this_run" > run.args
  IPI_INPUT=input.xml
  calls=$((STEPS + 1))
fi
# shellcheck source=../ipi_npt_water/start_ipi.sh
source "$HERE/start_ipi.sh"
start_ipi    # i-PI in the background on $IPI_INPUT, its socket ready, stopped on exit

echo "running $STEPS steps with $MODEL (i-PI log: $RUN/ipi.log)"
SECONDS=0
set +e
"$BIN/ekf-plugin" ipi --model "$MODEL" --template init.xyz --unix "$NAME" \
  --device "${DEVICE:-cpu}" --threads "${THREADS:-1}" --expected-calls "$calls"   # a progress line every minute
RC=$?
set -e
if [ $RC -ne 0 ]; then
  echo "client failed with exit code $RC; stopping i-PI (SIGTERM leaves a restartable RESTART file: the same command resumes)"
  exit $RC
fi
wait "$IPI"
trap - EXIT
if [ -n "$resume" ]; then   # the steps between the checkpoint and the stop were written twice: keep the later copy
  "$PYTHON" -c "import sys; from ekf_plugin.md.runner import drop_replayed_steps as d; [d(p) for p in sys.argv[1:]]" \
    npt.out $(ls npt.pos_*.xyz 2>/dev/null)
fi
rm -f npt.restart_*   # the run is complete (RESTART holds its end): the periodic checkpoints are not needed
echo "done: $STEPS steps in ${SECONDS} s"
"$PYTHON" "$HERE/plot_density.py" npt.out --out density.png
exit
}
