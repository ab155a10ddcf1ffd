"""Export trained models to ekf-plugin's own format and measure their validation errors.

    python evaluate.py RUN_DIR... --db data/water.db --models models --max-frames 100 --json errors.json

For each spktrain run directory: takes the model the selection rule keeps, writes ``<models>/<run id>.pt``
(ekf-plugin format, loads with ``torch.load(weights_only=True)`` and with ``ekf_plugin.calculator``), and
evaluates energy (meV/atom) and force (meV/Å) RMSE on the run's own validation split (``split.npz``), in
float64. ``--split train`` measures the same on the frames the run trained on instead (the like-for-like
comparison with a published potential's error on its own fit set).

Selection (``--keep``): ``last`` (default; the rule of the full-budget study, fixed before it was run): the
weights at the end of the run's budget, ``checkpoints/last.ckpt`` (read without running code from it) put
into the architecture of ``best_model``; no validation number chooses the model. ``best``: SchNetPack's
``best_model`` (lowest ``val_loss``, which the total-energy term dominates).

Besides the RMSEs, each entry has the energy error's trend with volume
(:func:`ekf_plugin.model_errors.energy_volume_trend`, the same as ``ekf-plugin errors``): its mean
(a common offset, which moves no atom), and the pressure the model adds, estimated from how its per-frame energy
error changes with the volume per atom across the frames (ΔP = −d(ΔE)/dV, in bar). A force RMSE cannot see this
pressure error, and it decides the density of NPT runs. ``--per-frame FILE`` also writes each frame's volume and
errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def validation_frames(db: Path, run_dir: Path, max_frames: int, split: str = "val"):
    """The first ``max_frames`` frames of the run's ``split`` ("val" or "train", from its ``split.npz``), in Å
    with their reference energy (eV) and forces (eV/Å) (:func:`ekf_plugin.data.read_db_frames`)."""
    from ekf_plugin.data import read_db_frames

    return read_db_frames(db, np.load(run_dir / "split.npz")[f"{split}_idx"][:max_frames])


def frame_errors(model_path: Path, frames, device: str = "cpu"):
    """Per-frame errors (:class:`ekf_plugin.model_errors.FrameErrors`: eV/atom, eV/Å, Å³/atom) of a model file on
    labelled ``frames`` (:func:`validation_frames`), float64."""
    from tqdm import tqdm

    from ekf_plugin.evaluation import ModelEvaluator, idle_cores
    from ekf_plugin.model_errors import frame_errors as errors_of

    def progress(it):  # a bar on stderr: 280 frames take minutes on a busy core
        return tqdm(it, total=len(frames), desc=Path(model_path).stem, unit="frame", leave=False, mininterval=5)

    return errors_of(ModelEvaluator(str(model_path), device=device, threads=idle_cores()), frames, progress=progress)


def rmse_on(model_path: Path, frames, device: str, per_frame: dict | None = None) -> dict:
    """Energy (meV/atom) and force (meV/Å) RMSE of a model on labelled ``frames``, with its energy–volume trend
    (:func:`ekf_plugin.model_errors.error_summary`); the per-frame values go into ``per_frame`` when given."""
    from ekf_plugin.model_errors import error_summary

    err = frame_errors(model_path, frames, device)
    if per_frame is not None:
        per_frame.update(volume_A3_per_atom=err.volume.tolist(), energy_error_meV_per_atom=(1e3 * err.energy).tolist(),
                         forces_rmse_meV_per_A=(1e3 * err.forces_rmse).tolist())
    return error_summary(err)


def kept_model(run: Path, keep: str):
    """The model of ``run`` that the selection rule ``keep`` (``last`` or ``best``) keeps, and its update count."""
    from ekf_plugin.models import load_model
    from ekf_plugin.uncertainty.covariance import checkpoint_model_state, read_checkpoint

    model = load_model(run / "best_model", stress=False)
    if keep == "best":
        return model, None
    ck = read_checkpoint(run / "checkpoints" / "last.ckpt")
    state = checkpoint_model_state(ck)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise SystemExit(f"{run}/checkpoints/last.ckpt lacks {sorted(missing)[:3]}: not this run's model")
    model.load_state_dict({k: state[k] for k in model.state_dict()})
    return model, int(ck.get("global_step", -1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--db", type=Path, required=True, help="the ASE database the runs trained on (Å, eV)")
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--max-frames", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=Path("errors.json"))
    p.add_argument("--keep", choices=("last", "best"), default="last",
                   help="which model of a run to keep: its final weights (last.ckpt) or best_model (lowest val_loss)")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="frames to measure on: the run's validation split (default) or its training split")
    p.add_argument("--per-frame", type=Path, default=None,
                   help="also write each frame's volume (Å³/atom), energy error (meV/atom) and force RMSE (meV/Å) here")
    args = p.parse_args(argv)
    from ekf_plugin.models import save_model

    args.models.mkdir(parents=True, exist_ok=True)
    table, frames = {}, {}
    for run in args.runs:
        out = args.models / f"{run.name}.pt"
        model, updates = kept_model(run, args.keep)
        save_model(model, out)
        frames[run.name] = {}
        table[run.name] = rmse_on(out, validation_frames(args.db, run, args.max_frames, args.split),
                                  args.device, frames[run.name])
        table[run.name].update(kept=args.keep, updates=updates, split=args.split)
        print(f"{run.name}: {table[run.name]}  -> {out}", flush=True)
    args.json.write_text(json.dumps(table, indent=2))
    if args.per_frame:
        args.per_frame.write_text(json.dumps(frames))
    return 0


if __name__ == "__main__":
    sys.exit(main())
