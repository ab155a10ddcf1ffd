"""Write the EKF covariance P of a trained model into a covariance file beside the model (<model>.cov.pt),
from a Lightning checkpoint that spktrain wrote with task=ekf_paper or task=ekf (checkpoints/last.ckpt,
epoch=NN.ckpt; best_model files hold no optimizer state). P belongs to the checkpoint's own weights: with
--save-model the command also writes those weights as a model file (ekf-plugin's BPNN format), otherwise
MODEL must hold the same weights (e.g. the epoch=NN.ckpt that best_model was stored with). Nothing in the
checkpoint is executed: its pickled training configuration is skipped (see docs/uncertainty.md)."""

from __future__ import annotations

import argparse

NAME = "covariance"
HELP = "write the EKF covariance P from an spktrain checkpoint to <model>.cov.pt (for uncertainties)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="Lightning checkpoint with the EKF state (checkpoints/last.ckpt, epoch=NN.ckpt)")
    parser.add_argument("--model", required=True,
                        help="the model the checkpoint trained (best_model, an ekf-plugin model file): names and shapes")
    parser.add_argument("--output", "-o", default=None,
                        help="covariance file (default: <model>.cov.pt beside MODEL, or beside --save-model)")
    parser.add_argument("--save-model", default=None, metavar="PATH",
                        help="also write the checkpoint's weights as an ekf-plugin model file (BPNN) at PATH")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="dtype of P in the file (float32 halves the size; default float64)")
    parser.add_argument("--trust-model", action="store_true",
                        help="allow a full unpickle of a best_model outside the allow-list (trusted files only)")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import torch

    from ..models import ModelLoadError, load_model, save_model
    from ..uncertainty.covariance import (CovarianceError, checkpoint_model_state, covariance_from_checkpoint,
                                          default_path, read_checkpoint, save_covariance)

    try:
        model = load_model(args.model, stress=False, trust_pickle=args.trust_model)
        ck = read_checkpoint(args.checkpoint)
        cov = covariance_from_checkpoint(args.checkpoint, model, ck)
        if args.save_model:
            state = checkpoint_model_state(ck)
            missing, _ = model.load_state_dict(state, strict=False)
            if any(k in dict(model.named_parameters()) for k in missing):
                raise CovarianceError(f"the checkpoint lacks model weights {missing[:3]}")
            try:
                target = save_model(model, args.save_model)
            except ValueError as exc:
                raise CovarianceError(f"--save-model writes ekf-plugin's BPNN format only ({exc}); for other models use "
                                      "the epoch=NN.ckpt that MODEL was stored with") from None
            out = Path(args.output) if args.output else default_path(target)
            print(f"wrote {target} (the checkpoint's weights)")
        else:
            cov.check_weights(model)
            out = Path(args.output) if args.output else default_path(args.model)
        dtype = torch.float32 if args.dtype == "float32" else torch.float64
        t0 = time.perf_counter()
        save_covariance(cov, out, dtype=dtype)
        dt = time.perf_counter() - t0
    except (FileNotFoundError, ModelLoadError, CovarianceError, ValueError) as exc:
        print(f"ekf-plugin covariance: error: {exc}")
        return 1
    kind = "dense" if cov.dense else f"{len(cov.blocks)} blocks (largest {max(b - a for a, b in cov.blocks)})"
    noise = ", ".join(f"{k}={v:g}" for k, v in (cov.label_weights or {}).items())
    print(f"wrote {out}: P of n = {cov.n} weights, {kind}, {args.dtype}, {out.stat().st_size / 1e6:.1f} MB in {dt:.2f} s; "
          f"{cov.step} EKF updates, R = {cov.noise:g}·I" + (f" on ξ = √(c/n)(ŷ − y) with {noise}" if noise else ""))
    return 0
