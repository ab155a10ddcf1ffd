"""Per-label Jacobians with autograd: the rows ∂ξ_k/∂w of an error vector ξ (plain torch, no chemistry).

Shared by the EKF optimizer (which needs J to build the Kalman gain) and the Fisher-information
analysis (which needs J to build JJᵀ or JᵀJ). Force labels need double backward: build ξ with
``create_graph=True`` when it contains derivatives of the model output.
"""

from __future__ import annotations

import warnings
from typing import List, Sequence

import torch


def flat_jacobian(
    outputs: torch.Tensor,
    params: Sequence[torch.Tensor],
    vectorize: bool = True,
) -> torch.Tensor:
    """Jacobian of a 1-D ``outputs`` vector w.r.t. ``params``, flattened and concatenated.

    Args:
        outputs: shape (m,), differentiable w.r.t. ``params``.
        params: tensors of n_1, ..., n_p elements (n = Σ n_i), in the order of the columns.
        vectorize: one batched backward (``is_grads_batched``, vmap) instead of m calls; falls
            back to the loop if an op of the model has no batching rule.

    The graph of ``outputs`` is kept (retain_graph) so callers may reuse it.

    Returns:
        J of shape (m, n) in the dtype of ``outputs``; parameters that ``outputs`` does not depend
        on give zero columns.
    """
    if outputs.dim() != 1:
        raise ValueError(f"outputs must be 1-D (m labels), got shape {tuple(outputs.shape)}")
    m = outputs.shape[0]  # number of labels
    params = list(params)
    if m == 0:
        return outputs.new_zeros((0, sum(p.numel() for p in params)))
    grads: List = []
    if vectorize and m > 1:
        eye = torch.eye(m, dtype=outputs.dtype, device=outputs.device)  # (m, m)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # vmap fallback performance notes
                grads = list(
                    torch.autograd.grad(
                        outputs, params, grad_outputs=eye, retain_graph=True,
                        allow_unused=True, is_grads_batched=True,
                    )
                )  # each (m, *p.shape)
        except RuntimeError:
            grads = []
    if not grads:
        rows = []
        for k in range(m):
            g = torch.autograd.grad(outputs[k], params, retain_graph=True, allow_unused=True)
            rows.append(g)
        grads = [
            torch.stack([row[i] if row[i] is not None else torch.zeros_like(p) for row in rows])
            for i, p in enumerate(params)
        ]  # each (m, *p.shape)
    cols = [
        (g if g is not None else torch.zeros((m, *p.shape), dtype=outputs.dtype, device=outputs.device)).reshape(m, -1)
        for g, p in zip(grads, params)
    ]  # each (m, n_i)
    return torch.cat(cols, dim=1).to(outputs.dtype)  # (m, n)


def flatten_grads(grads, params: List[torch.Tensor]) -> torch.Tensor:
    """(n,) one row of J: the gradients ``grads`` (one per parameter, None where a weight is unused: zeros) in the
    column order of ``params``."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
