#!/usr/bin/env bash
# The study's comparison on revPBE0-D3 water with ekf-plugin, end to end:
#   bash workflow.sh [train|evaluate|fisher|md|plots|all]     (default: all)
#   bash workflow.sh status     how far each run under $WORK/runs is (updates, rate, hours left, last errors; its NPT
#                               run: ps done of planned, density so far, "other model" for an older model's trajectory)
#   bash workflow.sh pack       each run's directory runs/<run> (those in RUNS, without RUNS all; last.ckpt with P or
#                               Adam's moments and the label-draw state, the best checkpoint, metrics, split, config;
#                               0.2–0.5 MB) into $PACKS/<run>.tar.gz,
#                               to carry an unfinished run to another machine or checkout; the train stage unpacks it
#                               there when runs/<run> is absent, and the run resumes exactly (its checkpoint callbacks
#                               follow the move: ekf_plugin.training.callbacks.LatestCheckpoint)
# Environment:
#   DATA        extxyz in Bohr/Hartree (default: ../shared/data/revpbe0-d3-cheng2019/dataset_1400_au.extxyz
#               beside the checkout)
#   WORK        working directory (default: ./work)
#   RUNS        run ids <ekf|adam>_lr<η>_s<seed>[_ef<f>][_thr] (default: EKF η=1e-3 and Adam η=1e-4, seeds 0 and 1;
#               Adam η=1e-3, seed 0); the seed sets the initial weights and the label draws; the 80/20 split is the
#               same for all runs; _ef<f> sets the fraction of energy updates (study: 0.5, e.g. _ef0.1); _thr chooses
#               the force labels by their error (n2p2's threshold selection, task.force_selection=threshold)
#   TRAIN_MIN   wall-clock minutes per training run (default 30); runs go in parallel, 1 thread each
#   MAX_UPDATES stop a run after this many updates (default: none, TRAIN_MIN decides); the full budget of the
#               study is MAX_UPDATES=500000 with a TRAIN_MIN large enough. A rerun resumes from the run's
#               checkpoints/last.ckpt (written every 1000 updates, P and the label-draw state included)
#   ADAM_UPDATES the same for the Adam runs (default MAX_UPDATES); e.g. 659000, the wall clock of a 500 k-update
#               threshold EKF run (1.32 Adam updates per EKF update, measured side by side; docs/results.md)
#   JOBS        trainings at a time (default: all runs at once); JOBS=2 on a 2-core machine queues the rest, each
#               run starts when one ends
#   THEN        what the train stage does with each run once its spktrain has ended without error, on the same core
#               and before the queue's next run starts there: "evaluate" (the evaluate stage for this run alone:
#               models/<run>.pt, errors_<run>.json) and/or "md" (the md stage for this run: MD_STEPS of NPT, resumed
#               from i-PI's newest checkpoint if it was stopped); default none. E.g. THEN="evaluate md" MD_STEPS=40000
#   VAL_EVERY   updates between validations (default 1000)
#   VAL_FRAMES  validation frames per validation (default 30, rounded up to batches of 10; the first ones of the
#               validation split)
#   VAL_FORCES  force components per validation frame from the cached features (default 10; 0: the full model,
#               all forces of every validation frame, as the 5 × 10⁵-update runs of sessions 5–7 did)
#   KEEP        the model kept per run: last (final weights, default) or best (lowest val_loss)
#   MD_STEPS    i-PI NPT steps per model (0.5 fs each; default 400)
#   EVAL_FRAMES validation frames for the RMSE of each model (default 280: all of them)
#   FISHER_LABELS  labels for the Fisher spectra (default 1000)
#   PACKS       where `pack` writes and `train` looks for <run>.tar.gz (default: ./inprogress)
set -euo pipefail
{ # the whole script is read before it runs: editing it (or a git pull) during a long queue cannot break the queue
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BIN="${BIN:-$REPO/.venv/bin}"
DATA="${DATA:-$REPO/../shared/data/revpbe0-d3-cheng2019/dataset_1400_au.extxyz}"
WORK="${WORK:-$HERE/work}"
PACKS="${PACKS:-$HERE/inprogress}"
MD_SCRIPT="${MD_SCRIPT:-$REPO/examples/ipi_npt_water/run.sh}"   # the NPT run of one model (i-PI + ekf-plugin ipi)
runs_given=${RUNS:+yes}
read -r -a RUNS <<< "${RUNS:-ekf_lr1e-3_s0 ekf_lr1e-3_s1 adam_lr1e-4_s0 adam_lr1e-4_s1 adam_lr1e-3_s0}"
stage="${1:-all}"
case $stage in train|evaluate|fisher|md|plots|all|status|pack) ;; *) echo "unknown stage $stage (want train, evaluate, fisher, md, plots, all, status or pack)" >&2; exit 2;; esac
mkdir -p "$WORK/data"
cd "$WORK"
if [[ $stage == status ]]; then
  shopt -s nullglob; runs=(runs/*/); [ ${#runs[@]} -gt 0 ] || { echo "no runs under $WORK/runs" >&2; exit 1; }
  exec "$BIN/python" "$HERE/analyze.py" status "${runs[@]}"
fi
if [[ $stage == pack ]]; then   # the runs named in RUNS, or without RUNS every run under runs/
  if [ -z "$runs_given" ]; then
    shopt -s nullglob; RUNS=(runs/*/); RUNS=("${RUNS[@]#runs/}"); RUNS=("${RUNS[@]%/}")
    [ ${#RUNS[@]} -gt 0 ] || { echo "no runs under $WORK/runs" >&2; exit 1; }
  fi
  mkdir -p "$PACKS"
  for r in "${RUNS[@]}"; do
    [ -d "runs/$r" ] || { echo "no run $r under $WORK/runs" >&2; exit 1; }
    # last.ckpt is replaced atomically (AtomicCheckpointIO), so a running training can be packed
    tar czf "$PACKS/$r.tar.gz.part" "runs/$r"
    mv "$PACKS/$r.tar.gz.part" "$PACKS/$r.tar.gz"
    echo "$PACKS/$r.tar.gz: $(tar tzf "$PACKS/$r.tar.gz" | grep -c -v '/$') files, $(du -k "$PACKS/$r.tar.gz" | cut -f1) KiB"
  done
  exit 0
fi
export OMP_NUM_THREADS=1
evaluate_runs() {   # the evaluate stage for the run ids $2.. (errors into $1): models/<id>.pt and RMSEs
  local json=$1; shift
  "$BIN/python" "$HERE/evaluate.py" "${@/#/runs/}" --db data/water.db --models "$HERE/models" --json "$json" \
    --max-frames "${EVAL_FRAMES:-280}" --keep "${KEEP:-last}"
}
md_run() {   # the md stage for run id $1: MD_STEPS of i-PI NPT with models/$1.pt, log md_$1.log
  RUN_DIR="$WORK/md_$1" SOCKET_NAME="ekf_w7_$1" bash "$MD_SCRIPT" "$HERE/models/$1.pt" "${MD_STEPS:-400}" > "md_$1.log" 2>&1
}

if [[ $stage == train || $stage == all ]]; then
  # one database for all runs (Å, eV), the same 80/20 split (+seed=0), UPDATES_PER_STEP updates per Lightning step
  # (default 10; runs written inside an epoch before session 26 resume with UPDATES_PER_STEP=1)
  ups=${UPDATES_PER_STEP:-10}
  (( ${VAL_EVERY:-1000} % ups == 0 )) || { echo "VAL_EVERY=${VAL_EVERY:-1000} is not a multiple of UPDATES_PER_STEP=$ups" >&2; exit 2; }
  [ -f data/water.db ] || "$BIN/python" -c "import sys; from ekf_plugin.data import read_frames, frames_to_db; frames_to_db(read_frames(sys.argv[1]), 'data/water.db')" "$DATA"
  m=${TRAIN_MIN:-30}
  max_time=$(printf '%02d:%02d:%02d:00' $((m / 1440)) $((m % 1440 / 60)) $((m % 60)))   # Lightning's DD:HH:MM:SS
  common=(data.datapath="$WORK/data/water.db" +seed=0 logger=csv trainer.accelerator=cpu data.num_workers=0
          trainer.limit_val_batches=$(( (${VAL_FRAMES:-30} + 9) / 10 )) trainer.val_check_interval=$(( ${VAL_EVERY:-1000} / ups )) task.updates_per_step="$ups"
          trainer.check_val_every_n_epoch=null trainer.max_epochs=100000
          "+trainer.max_time=$max_time" task.val_force_components="${VAL_FORCES:-10}")
  for r in "${RUNS[@]}"; do   # all ids checked before anything starts
    [[ $r =~ ^(ekf|adam)_lr([0-9.e-]+)_s([0-9]+)(_ef([0-9.]+))?(_thr)?$ ]] || {
      echo "bad run id $r (want <ekf|adam>_lr<eta>_s<seed>[_ef<energy fraction>][_thr])" >&2; exit 2; }
  done
  read -r -a then_steps <<< "${THEN:-}"
  for s in "${then_steps[@]}"; do
    [[ $s == evaluate || $s == md ]] || { echo "THEN: unknown step $s (want evaluate and/or md)" >&2; exit 2; }
  done
  jobs_max=${JOBS:-${#RUNS[@]}}
  declare -A names=()
  failed=0 running=0
  finish_one() {   # wait for the next training to end (bash >= 5.1); report it if it failed
    local pid="" st=0
    wait -n -p pid || st=$?
    if (( st == 5 )); then failed=1   # a THEN step failed (after_training said which)
    elif (( st != 0 )); then echo "training ${names[$pid]} failed: see $WORK/${names[$pid]}.log" >&2; failed=1; fi
    running=$((running - 1))
  }
  after_training() {   # THEN's steps for run $1, in order; the first that fails ends them (status 5)
    local r=$1 s
    for s in "${then_steps[@]}"; do
      echo "$(date -u +%FT%TZ) $s $r"
      case $s in
        evaluate) evaluate_runs "errors_$r.json" "$r" >> "$r.log" 2>&1 ;;
        md) md_run "$r" ;;
      esac || { echo "$s of $r failed: see $WORK/$([[ $s == md ]] && echo "md_$r" || echo "$r").log" >&2; return 5; }
    done
  }
  for r in "${RUNS[@]}"; do
    while (( running >= jobs_max )); do finish_one; done
    [[ $r =~ ^(ekf|adam)_lr([0-9.e-]+)_s([0-9]+)(_ef([0-9.]+))?(_thr)?$ ]]
    opt=${BASH_REMATCH[1]} lr=${BASH_REMATCH[2]} seed=${BASH_REMATCH[3]} ef=${BASH_REMATCH[5]:-0.5}
    selection=random; [[ -n ${BASH_REMATCH[6]} ]] && selection=threshold
    steps=${MAX_UPDATES:--1}; [[ $opt == adam ]] && steps=${ADAM_UPDATES:-$steps}
    if [ ! -d "runs/$r" ] && [ -f "$PACKS/$r.tar.gz" ]; then   # an unfinished run carried here by `pack`
      tar xzf "$PACKS/$r.tar.gz" && echo "$(date -u +%FT%TZ) unpacked $r from $PACKS/$r.tar.gz"
    fi
    echo "$(date -u +%FT%TZ) training $r (max_steps $steps)"
    # spktrain keeps a resumed run's first config.yaml; the budget of this launch is what `status` must show
    mkdir -p "runs/$r" && echo "$steps" > "runs/$r/max_steps"
    { "$BIN/spktrain" experiment=water_bpnn_$opt "${common[@]}" trainer.max_steps="$steps" task.optimizer_args.lr="$lr" \
        model.seed="$seed" task.seed="$seed" task.energy_fraction="$ef" task.force_selection="$selection" run.id="$r" \
        >> "$r.log" 2>&1 && after_training "$r"; } &
    names[$!]=$r running=$((running + 1))
  done
  while (( running > 0 )); do finish_one; done
  [ $failed = 0 ] || exit 1
fi
if [[ $stage == evaluate || $stage == all ]]; then
  evaluate_runs errors.json "${RUNS[@]}"
fi
if [[ $stage == fisher || $stage == all ]]; then
  models=(); for r in "${RUNS[@]}"; do models+=("$HERE/models/$r.pt"); done
  "$BIN/ekf-plugin" fisher "${models[@]}" --data "$DATA" --length-unit Bohr --index : --labels "${FISHER_LABELS:-1000}" --out fisher
fi
if [[ $stage == md || $stage == all ]]; then
  for r in "${RUNS[@]}"; do
    md_run "$r" &
  done
  wait
fi
if [[ $stage == plots || $stage == all ]]; then
  "$BIN/python" "$HERE/analyze.py" curves "${RUNS[@]/#/runs/}" --out learning_curves.png
  half_ps=$(awk "BEGIN{print ${MD_STEPS:-400} * 0.0005 / 2}")   # average the second half of each trajectory
  files=(); for r in "${RUNS[@]}"; do files+=("md_$r/npt.out"); done
  "$BIN/python" "$HERE/analyze.py" density "${files[@]}" --labels "${RUNS[@]}" --skip-ps "$half_ps" --out density.png \
    --json density.json || true
  trajs=(); for r in "${RUNS[@]}"; do trajs+=("md_$r/npt.pos_0.xyz"); done
  "$BIN/python" "$HERE/analyze.py" rdf "${trajs[@]}" --labels "${RUNS[@]}" --skip-ps "$half_ps" --out goo.png \
    --json goo.json || true
  "$BIN/python" "$HERE/analyze.py" table "${RUNS[@]/#/runs/}" > results_table.md
  md_ps=$(awk "BEGIN{print ${MD_STEPS:-400} * 0.0005}")
  "$BIN/python" "$HERE/analyze.py" summary "${RUNS[@]/#/runs/}" --md-planned-ps "$md_ps" --out models_summary.csv
  "$BIN/python" "$HERE/analyze.py" fisher-map models_summary.csv --out fisher_map.png || true
  "$BIN/python" "$HERE/analyze.py" pressure-map models_summary.csv --out pressure_map.png || true
  cat results_table.md
fi
exit
}
