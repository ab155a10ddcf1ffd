"""examples/water_revpbe0/workflow.sh, train stage: the run queue (JOBS), per-optimizer step budgets
(MAX_UPDATES, ADAM_UPDATES), the spktrain command line of each run id, failures reported.

``spktrain`` is replaced by a script on ``BIN`` that records its arguments and start/end times: this tests the
shell queue, not training (real ``spktrain`` runs are in tests/training/)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import REPO

WORKFLOW = REPO / "examples" / "water_revpbe0" / "workflow.sh"
RECORDER = r"""#!/usr/bin/env bash
id=""; for a in "$@"; do case $a in run.id=*) id=${a#run.id=};; esac; done
echo "start $id $(date +%s.%N) $*" >> "$TRACE"
sleep 0.6
echo "end $id $(date +%s.%N)" >> "$TRACE"
[[ $id == *_s9* ]] && exit 3
exit 0
"""


def _run(tmp_path, runs, **env):
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    (work / "data").mkdir(parents=True)
    (work / "data" / "water.db").touch()  # the database exists: the stage does not build it
    spk = bin_dir / "spktrain"
    spk.write_text(RECORDER)
    spk.chmod(0o755)
    trace = tmp_path / "trace"
    full_env = {**os.environ, "BIN": str(bin_dir), "WORK": str(work), "RUNS": runs, "TRACE": str(trace), **env}
    proc = subprocess.run(["bash", str(WORKFLOW), "train"], env=full_env, capture_output=True, text=True, timeout=60)
    events = [line.split(" ", 3) for line in trace.read_text().splitlines()] if trace.exists() else []
    return proc, events


def _max_concurrent(events) -> int:
    timeline = sorted((float(e[2]), 1 if e[0] == "start" else -1) for e in events)
    level = peak = 0
    for _, d in timeline:
        level += d
        peak = max(peak, level)
    return peak


def test_queue_runs_jobs_at_a_time_with_per_optimizer_budgets(tmp_path):
    runs = "ekf_lr1e-3_s1_ef0.1_thr adam_lr1e-4_s0_ef0.1_thr ekf_lr1e-3_s2 adam_lr1e-5_s1"
    proc, events = _run(tmp_path, runs, JOBS="2", MAX_UPDATES="500000", ADAM_UPDATES="659000")
    assert proc.returncode == 0, proc.stderr
    starts = {e[1]: e[3] for e in events if e[0] == "start"}
    assert sorted(starts) == sorted(runs.split())
    launched = [line.split()[2] for line in proc.stdout.splitlines() if " training " in line]
    assert launched == runs.split()  # queued in the order given (the queue's own log: two runs that start in the
    # same instant may write their first line in either order on a busy machine)
    assert _max_concurrent(events) == 2
    assert "trainer.max_steps=500000" in starts["ekf_lr1e-3_s2"]
    assert "trainer.max_steps=659000" in starts["adam_lr1e-5_s1"]
    # each launch's budget beside the run (`status` reads it: a resumed spktrain run keeps its first config.yaml)
    assert (tmp_path / "work" / "runs" / "adam_lr1e-5_s1" / "max_steps").read_text() == "659000\n"
    assert (tmp_path / "work" / "runs" / "ekf_lr1e-3_s2" / "max_steps").read_text() == "500000\n"
    thr = starts["ekf_lr1e-3_s1_ef0.1_thr"].split()
    assert "experiment=water_bpnn_ekf" in thr and "task.force_selection=threshold" in thr
    assert "task.energy_fraction=0.1" in thr and "model.seed=1" in thr and "task.seed=1" in thr
    adam = starts["adam_lr1e-4_s0_ef0.1_thr"].split()
    assert "experiment=water_bpnn_adam" in adam and "task.optimizer_args.lr=1e-4" in adam


def test_without_jobs_all_runs_start_at_once_and_adam_follows_max_updates(tmp_path):
    proc, events = _run(tmp_path, "ekf_lr1e-3_s0 adam_lr1e-4_s0 adam_lr1e-4_s1", MAX_UPDATES="1000")
    assert proc.returncode == 0, proc.stderr
    assert _max_concurrent(events) == 3
    assert all("trainer.max_steps=1000" in e[3] for e in events if e[0] == "start")


def test_a_failed_run_is_named_and_the_queue_goes_on(tmp_path):
    proc, events = _run(tmp_path, "adam_lr1e-4_s9 ekf_lr1e-3_s0 ekf_lr1e-3_s1", JOBS="1")
    assert proc.returncode == 1
    assert "training adam_lr1e-4_s9 failed" in proc.stderr
    assert [e[1] for e in events if e[0] == "end"] == ["adam_lr1e-4_s9", "ekf_lr1e-3_s0", "ekf_lr1e-3_s1"]
    assert _max_concurrent(events) == 1


@pytest.mark.parametrize("bad", ["sgd_lr1e-3_s0", "ekf_lr1e-3", "ekf_lr1e-3_s0_thr_ef0.1"])
def test_bad_run_ids_stop_before_anything_starts(tmp_path, bad):
    proc, events = _run(tmp_path, f"ekf_lr1e-3_s0 {bad}", JOBS="1")
    assert proc.returncode == 2 and f"bad run id {bad}" in proc.stderr
    assert events == []


def test_editing_the_script_during_a_queue_does_not_change_the_running_queue(tmp_path):
    # bash reads a script as it runs it: a `git pull` or an edit of workflow.sh during a multi-hour queue used to
    # make the running queue read a shifted file (a syntax error in its log). Here each "training" appends a line
    # to the script being run; the queue must neither run it nor fail.
    script = tmp_path / "workflow.sh"
    script.write_text(WORKFLOW.read_text())
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    (work / "data").mkdir(parents=True)
    (work / "data" / "water.db").touch()
    spk = bin_dir / "spktrain"
    spk.write_text(RECORDER.replace("sleep 0.6", 'echo "echo INJECTED; exit 7" >> "$SCRIPT"; sleep 0.2'))
    spk.chmod(0o755)
    env = {**os.environ, "BIN": str(bin_dir), "WORK": str(work), "RUNS": "ekf_lr1e-3_s0 adam_lr1e-4_s0",
           "TRACE": str(tmp_path / "trace"), "SCRIPT": str(script), "JOBS": "1"}
    proc = subprocess.run(["bash", str(script), "train"], env=env, capture_output=True, text=True, timeout=60)
    assert script.read_text().count("INJECTED") == 2  # the file did change under the queue
    assert proc.returncode == 0, proc.stderr
    assert "INJECTED" not in proc.stdout and proc.stdout.count(" training ") == 2


STEP_RECORDER = r"""#!/usr/bin/env bash
# records one THEN step: evaluate.py (run dir runs/<id>) or the NPT script (model models/<id>.pt)
id=""; for a in "$@"; do case $a in runs/*) id=evaluate:${a#runs/};; *.pt) id=md:$(basename "$a" .pt);; esac; done
echo "start $id $(date +%s.%N) $* RUN_DIR=${RUN_DIR:-}" >> "$TRACE"
sleep 0.3
echo "end $id $(date +%s.%N)" >> "$TRACE"
[[ $id == evaluate:*_s8* ]] && exit 4
exit 0
"""


def _run_then(tmp_path, runs, **env):
    """The train stage with spktrain, ``$BIN/python`` (evaluate.py) and ``MD_SCRIPT`` (the NPT run) recorded."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir(parents=True)
    (work / "data").mkdir(parents=True)
    (work / "data" / "water.db").touch()
    for name, text in (("spktrain", RECORDER), ("python", STEP_RECORDER), ("md.sh", STEP_RECORDER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    trace = tmp_path / "trace"
    full_env = {**os.environ, "BIN": str(bin_dir), "WORK": str(work), "RUNS": runs, "TRACE": str(trace),
                "MD_SCRIPT": str(bin_dir / "md.sh"), **env}
    proc = subprocess.run(["bash", str(WORKFLOW), "train"], env=full_env, capture_output=True, text=True, timeout=60)
    events = [line.split(" ", 3) for line in trace.read_text().splitlines()] if trace.exists() else []
    return proc, events


def test_then_evaluates_and_runs_npt_for_each_run_on_its_core_before_the_next_run(tmp_path):
    """THEN="evaluate md": once a run's spktrain has ended, the same queue slot evaluates that run alone and runs
    its NPT (MD_STEPS) before the slot takes the next run; JOBS bounds trainings, evaluations and MD together."""
    runs = "ekf_lr1e-3_s0 adam_lr1e-4_s0 ekf_lr1e-3_s1"
    proc, events = _run_then(tmp_path, runs, JOBS="2", THEN="evaluate md", MD_STEPS="40000", EVAL_FRAMES="280")
    assert proc.returncode == 0, proc.stderr
    t = {(e[0], e[1]): float(e[2]) for e in events}
    args = {e[1]: e[3] for e in events if e[0] == "start"}
    for r in runs.split():
        assert t["end", r] <= t["start", f"evaluate:{r}"] and t["end", f"evaluate:{r}"] <= t["start", f"md:{r}"]
        assert f"--json errors_{r}.json" in args[f"evaluate:{r}"] and "--max-frames 280" in args[f"evaluate:{r}"]
        md = args[f"md:{r}"].split()
        assert md[0] == str(REPO / "examples" / "water_revpbe0" / "models" / f"{r}.pt") and md[1] == "40000", md
        assert md[-1].startswith("RUN_DIR=") and md[-1].endswith(f"md_{r}")
    assert _max_concurrent(events) == 2
    first_done = min(t["end", f"md:{r}"] for r in runs.split()[:2])
    assert t["start", "ekf_lr1e-3_s1"] >= first_done, "the third run waits for a slot's training, evaluation and MD"


def test_then_skips_the_steps_of_a_failed_run_and_stops_at_a_failed_step(tmp_path):
    proc, events = _run_then(tmp_path, "ekf_lr1e-3_s9 adam_lr1e-4_s8 ekf_lr1e-3_s0", JOBS="1", THEN="evaluate md")
    assert proc.returncode == 1
    started = [e[1] for e in events if e[0] == "start"]
    assert started == ["ekf_lr1e-3_s9", "adam_lr1e-4_s8", "evaluate:adam_lr1e-4_s8", "ekf_lr1e-3_s0",
                       "evaluate:ekf_lr1e-3_s0", "md:ekf_lr1e-3_s0"]
    assert "training ekf_lr1e-3_s9 failed" in proc.stderr and "evaluate of adam_lr1e-4_s8 failed" in proc.stderr
    assert "training adam_lr1e-4_s8 failed" not in proc.stderr, "its training did not fail"
    bad, no_events = _run_then(tmp_path / "bad", "ekf_lr1e-3_s0", THEN="evaluate fisher")
    assert bad.returncode == 2 and "THEN: unknown step fisher" in bad.stderr and no_events == []


def test_pack_carries_an_unfinished_run_that_train_resumes_elsewhere(tmp_path):
    """`pack` writes each run's directory (last and best checkpoints); on a fresh work directory `train` unpacks
    it before spktrain starts (spktrain then resumes from checkpoints/last.ckpt); a run already there is not
    overwritten, and packing a run that does not exist fails by name."""
    run = "adam_lr1e-4_s0_ef0.1_thr"
    old = tmp_path / "old"
    ckpts = old / "runs" / run / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"state at 640000")
    (ckpts / "epoch=12.ckpt").write_bytes(b"best")
    (old / "runs" / run / "csv").mkdir()
    (old / "runs" / run / "csv" / "metrics.csv").write_text("epoch,step\n0,999\n")
    packs = tmp_path / "packs"
    env = {**os.environ, "WORK": str(old), "RUNS": run, "PACKS": str(packs)}
    proc = subprocess.run(["bash", str(WORKFLOW), "pack"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"{run}.tar.gz" in proc.stdout and sorted(p.name for p in packs.iterdir()) == [f"{run}.tar.gz"]
    missing = subprocess.run(["bash", str(WORKFLOW), "pack"], env={**env, "RUNS": "ekf_lr1e-3_s5"},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no run ekf_lr1e-3_s5" in missing.stderr
    (old / "runs" / "ekf_lr1e-3_s2").mkdir()
    every = subprocess.run(["bash", str(WORKFLOW), "pack"], env={k: v for k, v in env.items() if k != "RUNS"},
                           capture_output=True, text=True, timeout=60)  # without RUNS: every run under runs/
    assert every.returncode == 0, every.stderr
    assert sorted(p.name for p in packs.iterdir()) == [f"{run}.tar.gz", "ekf_lr1e-3_s2.tar.gz"]

    seen = RECORDER.replace('sleep 0.6', 'cat "runs/$id/checkpoints/last.ckpt" >> "$TRACE"; echo >> "$TRACE"; '
                            'ls "runs/$id/checkpoints" >> "$TRACE"; sleep 0.1')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "spktrain").write_text(seen)
    (bin_dir / "spktrain").chmod(0o755)
    new = tmp_path / "new"
    (new / "data").mkdir(parents=True)
    (new / "data" / "water.db").touch()
    trace = tmp_path / "trace"
    env = {**env, "WORK": str(new), "BIN": str(bin_dir), "TRACE": str(trace)}
    proc = subprocess.run(["bash", str(WORKFLOW), "train"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"unpacked {run}" in proc.stdout
    lines = trace.read_text().splitlines()
    assert "state at 640000" in lines and "last.ckpt" in lines and "epoch=12.ckpt" in lines
    assert (new / "runs" / run / "csv" / "metrics.csv").read_text() == "epoch,step\n0,999\n"
    (new / "runs" / run / "checkpoints" / "last.ckpt").write_bytes(b"state at 700000")  # the run went on here
    proc = subprocess.run(["bash", str(WORKFLOW), "train"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "unpacked" not in proc.stdout
    assert "state at 700000" in trace.read_text().splitlines()
