"""Extended Kalman Filter optimizer for neural networks (plain PyTorch; no chemistry, no SchNetPack).

Algorithm (Shao et al., J. Chem. Phys. 155, 204108 (2021), Algorithm 2; notation of Singraber et al.,
JCTC 15, 3075 (2019))::

    ξ = closure()                      # error vector ŷ − y, shape (m,), built with an autograd graph
    J = ∂ξ/∂w                          # (m, n), batched autograd (double backward for force labels)
    A = [J P Jᵀ + R]⁻¹,  R = I/η       # (m, m), Cholesky
    K = P Jᵀ A                         # (n, m)
    P ← (I − K J) P + Q,  Q = q·I      # (n, n), float64
    w ← w − K ξ

Sign: the study writes ``w + Kξ``, which is right for ξ = y − ŷ. Here ξ = ŷ − y (prediction minus
label) and J = ∂ξ/∂w, so the step that reduces the error is ``w − Kξ`` (the Gauss–Newton direction).

Implementation (in place, one n×n temporary-free pass over each P block)::

    X = P Jᵀ                     (n, m)   reads P once
    L = chol(J X + R)            (m, m)
    V = L⁻¹ Xᵀ                   (m, n)   so that K = Vᵀ L⁻¹ and K Xᵀ = Vᵀ V (symmetric by construction)
    w ← w − Vᵀ (L⁻¹ ξ)
    P ← P − Vᵀ V                 reads and writes P once (addmm_)
    diag(P) += q

Block-decoupled P (``blocks``): P is block-diagonal, P = diag(P_1, …, P_B), with one *shared*
innovation A = Σ_b J_b P_b J_bᵀ + R (ED-GEKF / NDEKF of Gastegger & Marquetand, JCTC 11, 2187 (2015);
n2p2 PR #61's decoupling taxonomy; the greedy ≤ B packing of the LKF, Hu et al., AAAI 2023). A single
block is exactly the dense filter.

Options and their sources:

* ``lr`` = η, R = I/η (study, Algorithm 2; PiNN). It lives in ``param_groups[0]["lr"]``, so any
  ``torch.optim.lr_scheduler`` may drive it (PiNN's ExponentialDecay(0.03, 1e4, 0.994) is
  ``StepLR(step_size=10000, gamma=0.994)`` stepped per update).
* ``eta_growth``, ``eta_max``: η ← min(η·eta_growth, eta_max) after every update (n2p2
  ``kalman_etatau``/``kalman_etamax``; eta_growth = exp(2.302/updates_per_epoch) is one decade per epoch).
* ``q``, ``q_decay``, ``q_min``: Q = q_t·I with q_t = max(q·q_decayᵗ, q_min) (n2p2 ``kalman_q0``,
  ``kalman_qtau``, ``kalman_qmin``; PiNN ``q_0``, ``q_tau``, ``q_min``). Study: q = 0.
* ``fading_lambda``, ``fading_nu``: n2p2's fading-memory filter (``kalman_type 1``): R = λ·I replaces I/η,
  P ← P/λ after each update, λ ← ν·λ + 1 − ν. n2p2 marks it "not recommended"; λ 0.96–0.99, ν 0.99–0.9995.
* ``p0``: P(0) = p0·I (study: 1; n2p2 1/kalman_epsilon).
* ``symmetrize_every``: P ← (P + Pᵀ)/2 every k updates (0 = never). The update itself is symmetric by
  construction (Vᵀ V); this only removes round-off drift. (No-op with the ``"blas"`` kernel, which keeps
  P exactly symmetric by storing one triangle.)
* ``innovation_gate``: reject an update whose largest normalised innovation abs(ξᵢ)/√Aᵢᵢ exceeds the gate
  (an outlier label: A = JPJᵀ + R is the filter's predicted variance of ξ). None = off. A gated update
  counts as a rejected one (weights and P unchanged); ``max_failures`` consecutive ones raise.
* ``kernel``: the dense algebra. ``"blas"`` (CPU): symmetric BLAS through SciPy (``?symm``/``?symv`` for
  X = PJᵀ, ``?syrk``/``?syr`` for P −= VᵀV) on the upper triangle of each block only: half the memory
  traffic of ``"torch"`` (full ``mm``/``addmm_``, any device), and on this project's 2-core CPU 2.5–4×
  faster (``benchmarks/bench_ekf.py``). ``"auto"`` (default): ``"blas"`` for CPU blocks when SciPy is
  importable, else ``"torch"``. Both give the same P and weights to round-off; the state dict always
  holds full symmetric blocks, so a checkpoint resumes under either kernel.

* ``defer_rows``: P −= VᵀV is deferred: P is kept as c·(S − WᵀW), the rows of accepted updates appended to
  W (scaled by 1/√c) and the fading memory's 1/λ to the scalar c, and W is applied to the stored S in one
  rank-r pass when it reaches ``defer_rows`` rows, or when P is read (``state_dict``, ``covariance``,
  ``ekf_state``, ``diagnostics``). X = PJᵀ is c·(S Jᵀ − Wᵀ(W Jᵀ)). The rank-1 update of an energy label was
  a pass over the triangle of P at memory speed (≈ 3 ms for the water BPNN); deferred, 32 rows cost one
  ``?syrk`` pass at FMA speed. 0 = apply every update at once (the behaviour before). A sharded P defers
  in the same way: every process keeps the same W and applies it to its own rows. Same P and weights to
  round-off. The process noise waits beside W as a vector g (P = c·(S + diag(g) − WᵀW)), and diag(S) is
  kept as a vector between applications: P's diagonal, n elements one page apart, is otherwise read (the
  positivity check) and written (+q) once per update, ~0.1 ms each after a pass over P (the study's filter
  step 4.90 → 4.83 ms with q = 0).

Safety: before P is overwritten the new diagonal diag(P) − Σ_rows V∘V is checked to stay positive (a
float32 P with a huge η went indefinite silently before); if not, the update is rejected.

Jacobian supplied by the caller: the closure may return ``(ξ, J)`` with J (m, n) the Jacobian in the
order of the optimizer's parameters (flattened, concatenated); then no autograd graph is needed. This
is how a model with closed-form label Jacobians (the BPNN label predictor) skips autograd.

Multistream (n2p2's multistream EKF, JCTC 2019): under an initialised ``torch.distributed`` process
group with more than one process, each process's ξ and J rows are all-gathered and every process
applies the identical update with m = Σ m_rank labels, so weights stay identical everywhere.

Sharded filter (``shard``, :mod:`ekf_plugin.optim.sharded`): with W > 1 processes each one owns 1/W of
the upper triangle of P (row ranges of equal cost, or whole blocks when there are many) and does the two
passes over P on its rows only; X = P Jᵀ and diag P are all-reduced ((m+1)·n numbers), and the gain and
the weight increment are computed identically everywhere. ``shard="auto"`` (default) shards whenever a
group with more than one process is initialised when the optimizer is built; ``"none"`` keeps a full P
on every process (the multistream behaviour before); ``"rows"`` forces the sharded algebra (also with
one process). The labels of an update come either from every process's own structure (``multistream``:
m = Σ m_rank) or, with ``label_split=True``, from one structure whose label rows the processes share
(:meth:`EKF.split_rows`): the same update as one process, at 1/W of its work per process.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch.autograd.graph import increment_version
from torch.optim import optimizer as _torch_optimizer

from ekf_plugin.jacobian import flat_jacobian
from ekf_plugin.optim.kernels import FilterKernel, select_kernel
from ekf_plugin.optim.shared_memory import SharedMemoryGroup, all_gather
from ekf_plugin.optim.sharded import ShardPlan, process_group_info, split_rows, sum_rows

log = logging.getLogger(__name__)

__all__ = ["EKF", "EKFDivergenceError", "plan_blocks", "SHARD_MODES"]

SHARD_MODES = ("auto", "none", "rows")

_STATE_KEY = "ekf"


class EKFDivergenceError(RuntimeError):
    """Raised after ``max_failures`` consecutive rejected (non-finite) updates."""


def plan_blocks(
    sizes: Sequence[int], groups: Sequence[int], blocks: Union[str, int]
) -> List[Tuple[int, int]]:
    """Split the flat weight vector into contiguous blocks ``[(start, stop), ...]``.

    Args:
        sizes: element count of each parameter tensor, in flat order.
        groups: param-group index of each tensor (same length as ``sizes``).
        blocks: ``"dense"`` (one block), ``"group"`` (one block per param group), ``"tensor"`` (one per
            parameter tensor) or an int B: greedy packing of consecutive tensors into blocks of ≤ B
            weights, tensors larger than B are cut into chunks of B (LKF).
    """
    n = int(sum(sizes))
    if isinstance(blocks, bool) or not (isinstance(blocks, (str, int))):
        raise ValueError(f"blocks must be 'dense', 'group', 'tensor' or a positive int, got {blocks!r}")
    if blocks == "dense":
        return [(0, n)] if n else []
    bounds: List[Tuple[int, int]] = []
    start = 0
    if blocks in ("group", "tensor"):
        pos = 0
        for i, s in enumerate(sizes):
            if i > 0 and (blocks == "tensor" or groups[i] != groups[i - 1]) and pos > start:
                bounds.append((start, pos))
                start = pos
            pos += int(s)
        bounds.append((start, n))
        return [b for b in bounds if b[1] > b[0]]
    if isinstance(blocks, int):
        if blocks < 1:
            raise ValueError(f"block size must be >= 1, got {blocks}")
        cur, pos = 0, 0
        for s in sizes:
            if cur + s <= blocks:
                cur += s
                pos += s
                continue
            if cur:
                bounds.append((pos - cur, pos))
                cur = 0
            while s > blocks:
                bounds.append((pos, pos + blocks))
                pos += blocks
                s -= blocks
            cur, pos = s, pos + s
        if cur:
            bounds.append((pos - cur, pos))
        return bounds
    raise ValueError(f"blocks must be 'dense', 'group', 'tensor' or a positive int, got {blocks!r}")


_NATIVE_GAIN = os.environ.get("EKF_PLUGIN_NATIVE_GAIN", "1") != "0"  # "0": the torch algebra of an update everywhere


def _optim_hooks(opt: torch.optim.Optimizer):
    """(pre-hooks, post-hooks) of ``opt.step`` in ``torch.optim.Optimizer``'s order (global pre-hooks first, global
    post-hooks last), or None when there are none."""
    g_pre, g_post = _torch_optimizer._global_optimizer_pre_hooks, _torch_optimizer._global_optimizer_post_hooks
    if not (g_pre or g_post or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks):
        return None
    return ([*g_pre.values(), *opt._optimizer_step_pre_hooks.values()],
            [*opt._optimizer_step_post_hooks.values(), *g_post.values()])


class EKF(torch.optim.Optimizer):
    """Extended Kalman Filter optimizer (see the module docstring for the algorithm and sources).

    Use::

        opt = EKF(model.parameters(), lr=1e-3)
        def closure():
            return model(x).reshape(-1) - y      # ξ = ŷ − y, shape (m,), with a graph
        opt.step(closure)

    ``loss.backward(); opt.step()`` is rejected: the filter needs the per-label errors, not a loss.

    Args:
        params: parameters or param groups (groups matter only for ``blocks="group"``; the filter
            hyper-parameters are global and read from the first group).
        lr: η, R = I/η (study: 1e-3 for EKF). > 0.
        p0: P(0) = p0·I. > 0.
        q: process noise q₀ ≥ 0 (Q = q·I; study: 0).
        q_decay: per-update factor of q in (0, 1]. q_min: floor of q.
        eta_growth: per-update factor of η (≥ 1 grows, n2p2). eta_max: cap of η.
        fading_lambda, fading_nu: fading-memory filter (R = λI, P ← P/λ, λ ← νλ + 1 − ν); None = off.
        blocks: ``"dense"``, ``"group"``, ``"tensor"`` or int B (see :func:`plan_blocks`).
        dtype: dtype of P and the filter algebra (default float64 regardless of the model dtype).
        max_dense_bytes: refuse a P larger than this (bytes) with advice to use blocks.
        max_failures: raise :class:`EKFDivergenceError` after this many consecutive rejected updates.
        symmetrize_every: P ← (P + Pᵀ)/2 every k accepted updates (0 = never).
        multistream: gather ξ and J over ``torch.distributed`` when it is initialised (world size > 1).
        process_group: the process group for multistream and sharding (default: the world).
        shard: ``"auto"`` (shard P by rows when a group of > 1 processes is initialised at construction and
            ξ, J are the same everywhere; without ``multistream`` and ``label_split`` every process keeps
            its own filter, as before),
            ``"none"`` (a full P on every process) or ``"rows"`` (always the sharded algebra), see
            :mod:`ekf_plugin.optim.sharded`. A sharded filter needs the same ξ and J on every process:
            ``multistream`` or ``label_split``.
        label_split: the closure computes the same labels on every process, the expensive rows shared out
            with :meth:`split_rows`; ξ and J are then not gathered (m is the labels of one process).
        vectorize_jacobian: batched Jacobian (``is_grads_batched``) instead of m backward calls.
        innovation_gate: reject updates with max abs(ξᵢ)/√Aᵢᵢ above this (None = off; e.g. 10).
        kernel: ``"auto"``, ``"blas"``, ``"torch"`` (module docstring, :mod:`ekf_plugin.optim.kernels`) or
            ``"native"`` (compiled thin-update kernel for large blocked P, :mod:`ekf_plugin.optim.native`).
        comm: how the processes exchange the labels and X = P Jᵀ of an update: ``"auto"`` (default) through
            shared memory when they are all on this machine (an x86 CPU, P on the CPU, room in ``/dev/shm``;
            :class:`~ekf_plugin.optim.shared_memory.SharedMemoryGroup`, built collectively here), else
            ``torch.distributed``; ``"torch"``: always ``torch.distributed``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        p0: float = 1.0,
        q: float = 0.0,
        q_decay: float = 1.0,
        q_min: float = 0.0,
        eta_growth: float = 1.0,
        eta_max: float = math.inf,
        fading_lambda: Optional[float] = None,
        fading_nu: float = 0.9995,
        blocks: Union[str, int] = "dense",
        dtype: torch.dtype = torch.float64,
        max_dense_bytes: float = 8 * 2**30,
        max_failures: int = 10,
        symmetrize_every: int = 100,
        multistream: bool = True,
        process_group: Any = None,
        vectorize_jacobian: bool = True,
        innovation_gate: Optional[float] = None,
        kernel: str = "auto",
        shard: str = "auto",
        label_split: bool = False,
        defer_rows: int = 32,
        comm: str = "auto",
    ) -> None:
        _check(lr > 0 and math.isfinite(lr), f"lr (η) must be a finite number > 0, got {lr}")
        _check(p0 > 0 and math.isfinite(p0), f"p0 must be a finite number > 0, got {p0}")
        _check(q >= 0 and q_min >= 0, f"q and q_min must be >= 0, got q={q}, q_min={q_min}")
        _check(0 < q_decay <= 1, f"q_decay must be in (0, 1], got {q_decay}")
        _check(eta_growth > 0 and eta_max > 0, f"eta_growth and eta_max must be > 0, got {eta_growth}, {eta_max}")
        if fading_lambda is not None:
            _check(0 < fading_lambda <= 1, f"fading_lambda must be in (0, 1], got {fading_lambda}")
            _check(0 < fading_nu <= 1, f"fading_nu must be in (0, 1], got {fading_nu}")
        _check(max_failures >= 1, f"max_failures must be >= 1, got {max_failures}")
        _check(symmetrize_every >= 0, f"symmetrize_every must be >= 0, got {symmetrize_every}")
        _check(innovation_gate is None or innovation_gate > 0, f"innovation_gate must be > 0 or None, got {innovation_gate}")
        _check(shard in SHARD_MODES, f"shard must be one of {SHARD_MODES}, got {shard!r}")
        _check(int(defer_rows) >= 0, f"defer_rows must be >= 0, got {defer_rows}")
        _check(comm in ("auto", "torch"), f"comm must be 'auto' or 'torch', got {comm!r}")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        _check(dtype in (torch.float32, torch.float64), f"dtype must be float32 or float64, got {dtype}")
        defaults = dict(lr=lr)
        super().__init__(params, defaults)
        self.p0, self.q0, self.q_decay, self.q_min = float(p0), float(q), float(q_decay), float(q_min)
        self.eta_growth, self.eta_max = float(eta_growth), float(eta_max)
        self.fading_lambda, self.fading_nu = fading_lambda, float(fading_nu)
        self.dtype, self.max_failures, self.symmetrize_every = dtype, int(max_failures), int(symmetrize_every)
        self.multistream, self.process_group = multistream, process_group
        self.vectorize_jacobian = vectorize_jacobian
        self.innovation_gate = None if innovation_gate is None else float(innovation_gate)
        self._params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        _check(len(self._params) > 0, "EKF got no parameters that require grad")
        sizes = [p.numel() for p in self._params]
        gidx = [i for i, g in enumerate(self.param_groups) for p in g["params"] if p.requires_grad]
        self.blocks = plan_blocks(sizes, gidx, blocks)
        self.n = int(sum(sizes))
        nbytes = sum((b - a) ** 2 for a, b in self.blocks) * torch.finfo(dtype).bits // 8
        log.info(
            "EKF: n = %d weights, %d P block(s) (largest %d), P memory %.1f MiB (%s)",
            self.n, len(self.blocks), max(b - a for a, b in self.blocks), nbytes / 2**20, dtype,
        )
        if nbytes > max_dense_bytes:
            raise ValueError(
                f"EKF: P would take {nbytes / 2**30:.1f} GiB for n = {self.n} weights with blocks={blocks!r} "
                f"(limit max_dense_bytes = {max_dense_bytes / 2**30:.1f} GiB). Use a block-decoupled P, e.g. "
                f"blocks=5120 (greedy blocks of <= 5120 weights, ~200 MiB each) or blocks='tensor', "
                f"or raise max_dense_bytes."
            )
        self.memory_bytes = nbytes
        self._big = torch.finfo(dtype).max ** 0.25  # bound on |V| that keeps VᵀV finite
        self.kernel: FilterKernel = select_kernel(kernel, self._params[0].device, dtype)
        self.label_split = bool(label_split)
        self.defer_rows = int(defer_rows)
        rank, world = process_group_info(process_group)
        self.shard: Optional[ShardPlan] = None
        same_rows = multistream or label_split  # ξ and J the same on every process
        if world > 1 and comm == "auto" and self._params[0].device.type == "cpu" and (same_rows or shard == "rows"):
            shm = SharedMemoryGroup.create(process_group, capacity=_message_bytes(self.n, dtype))
            if shm is not None:  # the same decision on every process (create is collective)
                self.process_group = process_group = shm
                log.info("EKF: the processes exchange labels and X = P Jᵀ through shared memory")
        if shard == "rows" or (shard == "auto" and world > 1 and same_rows):
            if world > 1 and not same_rows:
                raise ValueError("EKF: a sharded P needs the same ξ and J on every process: multistream=True "
                                 "(each process's labels gathered) or label_split=True, or use shard='none'")
            self.shard = ShardPlan(self.blocks, rank, world, process_group, self.kernel)
            log.info("EKF: P sharded over %d processes, this one (rank %d) holds %.1f MiB", world, rank,
                     self.shard.local_bytes(itemsize=torch.finfo(dtype).bits // 8) / 2**20)
        self._init_state()

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        self._reset_deferred()
        dev = self._params[0].device
        if self.shard is not None:
            P = self.shard.init(self.p0, self.dtype, dev)  # [D_0, R_0, ...]: this process's rows
        else:
            P = [torch.eye(b - a, dtype=self.dtype, device=dev).mul_(self.p0) for a, b in self.blocks]
        self.state[_STATE_KEY] = {
            "P": P,  # list of (n_b, n_b); sharded: this process's pieces [D_0, R_0, ...]
            "step": 0,
            "q": self.q0,
            "lam": self.fading_lambda,
            "failures": 0,
            "rejected": 0,
            "last_error": "",
        }

    @property
    def params(self) -> List[torch.Tensor]:
        """The filtered parameters in the column order of J (and of P): flattened, concatenated."""
        return list(self._params)

    @property
    def ekf_state(self) -> Dict[str, Any]:
        """The filter state: ``P`` (list of blocks; sharded: this process's pieces ``[D_0, R_0, ...]``, see
        :class:`~ekf_plugin.optim.sharded.ShardPlan`), ``step``, ``q``, ``lam``, ``failures``, ``rejected``.
        Deferred rows are applied first, so ``P`` is current."""
        self.apply_deferred()
        return self.state[_STATE_KEY]

    @property
    def rejected_updates(self) -> int:
        """Updates rejected so far (non-finite or gated); unlike :attr:`ekf_state`, reading it applies no
        deferred rows (cheap on every logging step)."""
        return int(self.state[_STATE_KEY]["rejected"])

    def _reset_deferred(self) -> None:
        """No deferred work: P_b = c (S_b + diag(g_b) − W_bᵀ W_b) with c = 1, no g, no W (the stored S is P)."""
        self._deferred: List[Optional[torch.Tensor]] = [None] * len(self.blocks)  # W_b (r, n_b), views of _wbuf
        self._wbuf: List[Optional[torch.Tensor]] = [None] * len(self.blocks)  # storage of W_b, reused
        self._wsq: List[Optional[torch.Tensor]] = [None] * len(self.blocks)  # Σ_rows W_b∘W_b (n_b,), kept with W_b
        self._gdiag: Optional[torch.Tensor] = None  # (n,) g: process noise not yet added to diag S
        self._sdiag: Optional[torch.Tensor] = None  # (n,) diag S (sharded: own rows, 0 elsewhere); None: read again
        self._sdiag_all: Optional[torch.Tensor] = None  # sharded: (n,) the whole diag S, all-reduced once after it changed
        self._c = 1.0

    def _s_diagonal(self) -> torch.Tensor:
        """(n,) diag of the stored S (sharded: this process's rows, zeros elsewhere), read once after S changed:
        its elements lie n + 1 apart (one page each), ~0.1 ms per read after a pass over P."""
        if self._sdiag is None:
            Ps = self.state[_STATE_KEY]["P"]
            if self.shard is not None:
                self._sdiag = self.shard.own_diagonal(Ps)
                self._sdiag_all = None  # exchanged again with the next X
            else:
                self._sdiag = torch.cat([self.kernel.diagonal(Pb) for Pb in Ps])  # a copy
        return self._sdiag

    def apply_deferred(self) -> None:
        """Apply the deferred work to the stored blocks, S ← c·(S + diag(g) − WᵀW); P does not change."""
        Ps, c, kern, g = self.state[_STATE_KEY]["P"], self._c, self.kernel, self._gdiag
        if c == 1.0 and g is None and all(W is None for W in self._deferred):
            return
        if self.shard is not None:  # this process's pieces of every block; W_b side by side: (r, n)
            if g is not None:
                self.shard.add_diagonal_(Ps, g)
            if self._deferred[0] is not None:
                W = self._deferred[0] if len(self.blocks) == 1 else torch.cat(self._deferred, 1)
                self.shard.sub_gram_(Ps, W)
            if c != 1.0:
                for piece in Ps:
                    piece.mul_(c)
        else:
            for (a, e), Pb, W in zip(self.blocks, Ps, self._deferred):
                if g is not None:
                    Pb.diagonal().add_(g[a:e])
                if W is not None:
                    if kern.fused_scale:
                        kern.sub_gram_(Pb, W, c)  # one pass: S ← c(S − WᵀW)
                    else:
                        kern.sub_gram_(Pb, W)
                        if c != 1.0:
                            Pb.mul_(c)
                elif c != 1.0:
                    Pb.mul_(c)
        self._deferred = [None] * len(self.blocks)
        self._wsq = [None] * len(self.blocks)
        self._gdiag = self._sdiag = None
        self._c = 1.0

    def _full_blocks(self) -> List[torch.Tensor]:
        """The full symmetric P blocks (new tensors; collective when sharded)."""
        Ps = self.ekf_state["P"]
        if self.shard is not None:
            return self.shard.gather([p.detach() for p in Ps])
        return [f.clone() if f.data_ptr() == p.data_ptr() else f  # a copy, never P itself
                for p, f in ((p, self.kernel.full(p.detach())) for p in Ps)]

    def state_dict(self) -> Dict[str, Any]:
        """Torch optimizer state dict; the filter state (P blocks, counters) is copied, not aliased.

        It always holds the full symmetric P blocks, so a checkpoint resumes with any number of processes.
        Sharded: the blocks are assembled from every process's rows, so every process must call it (as
        Lightning does when it writes a checkpoint)."""
        sd = super().state_dict()
        st = sd["state"][_STATE_KEY]
        sd["state"][_STATE_KEY] = {**st, "P": self._full_blocks()}  # symmetric blocks
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore P and all counters (copied; P moved to the parameters' device and the filter dtype).

        Raises ValueError with an explanation when ``state_dict`` was written by another optimizer
        (e.g. Adam: no P) or for other P blocks.
        """
        saved = state_dict.get("state", {}) if isinstance(state_dict, dict) else {}
        ekf_saved = saved.get(_STATE_KEY) if isinstance(saved, dict) else None
        if not isinstance(ekf_saved, dict) or "P" not in ekf_saved:
            raise ValueError(
                "EKF.load_state_dict: this optimizer state was not written by the EKF (it has no covariance P; "
                "keys: " + ", ".join(map(str, list(saved)[:5])) + "). To continue from another optimizer's "
                "weights with the EKF, load the model weights only and start a fresh filter (P = p0·I)."
            )
        super().load_state_dict(state_dict)
        st = dict(self.state[_STATE_KEY])
        dev = self._params[0].device
        if [tuple(p.shape) for p in st["P"]] != [(b - a, b - a) for a, b in self.blocks]:
            raise ValueError("EKF.load_state_dict: the saved P blocks do not match this optimizer's blocks")
        if self.shard is not None:
            st["P"] = self.shard.scatter(st["P"], self.dtype, dev)  # this process's rows
        else:
            st["P"] = [p.to(device=dev, dtype=self.dtype).clone() for p in st["P"]]
        self.state[_STATE_KEY] = st
        self._reset_deferred()

    def covariance(self) -> torch.Tensor:
        """Dense P (n, n) assembled from the blocks (for analysis and tests; costs n² memory; collective
        when sharded)."""
        out = torch.zeros(self.n, self.n, dtype=self.dtype, device=self._params[0].device)
        for (a, b), Pb in zip(self.blocks, self._full_blocks()):
            out[a:b, a:b] = Pb
        return out

    def split_rows(self, fn: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]], idx: torch.Tensor,
                   key: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """Labels and Jacobian rows ``fn(idx)`` → ((k,), (k, n)), each process computing a contiguous share of
        ``idx`` (k,), all-gathered (:func:`ekf_plugin.optim.sharded.split_rows`; ``key`` identifies the input,
        e.g. the structure index, and is checked to agree). For ``label_split=True``."""
        return split_rows(fn, idx, key, self.process_group, self.n)

    def split_values(self, fn: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor, key: float = 0.0
                     ) -> torch.Tensor:
        """Values ``fn(idx)`` (k,) without rows, each process computing a contiguous share of ``idx`` (k,),
        all-gathered in the order of ``idx`` (e.g. a threshold selection's candidates; ``key`` is checked to
        agree, as in :meth:`split_rows`). For ``label_split=True``."""
        def share(i: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            v = fn(i)  # (k_r,)
            return v, v.new_empty(i.numel(), 0)  # no rows
        return split_rows(share, idx, key, self.process_group, 0)[0]

    def sum_rows(self, fn: Callable[[int, int], Tuple[torch.Tensor, torch.Tensor]],
                 key: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """Labels and Jacobian rows that are sums of terms, ``fn(rank, world)`` → partial ((k,), (k, n)) of this
        process's share of the terms, summed over the processes (:func:`ekf_plugin.optim.sharded.sum_rows`; e.g.
        an energy label split by element network). For ``label_split=True``."""
        return sum_rows(fn, key, self.process_group, self.n)

    # ------------------------------------------------------------------ step
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:  # type: ignore[override]
        """One filter update. ``closure()`` must return ξ = ŷ − y (1-D, m labels) with its graph.

        Returns ξ (detached, before the update; the gathered ξ under multistream). A non-finite ξ, J or
        gain rejects the update (weights and P unchanged), logs a warning and counts a failure; after
        ``max_failures`` consecutive failures :class:`EKFDivergenceError` is raised.

        What ``torch.optim.Optimizer`` wraps around ``step`` is done here, for less per update: the step
        pre- and post-hooks (global and this optimizer's) run as there; the profiler's ``Optimizer.step#EKF.step``
        range is recorded only while a profiler runs (the wrapper's ``record_function`` costs ~10 µs per update
        otherwise, 1–2 % of a study update).
        """
        hooks = _optim_hooks(self)
        if hooks is None and not torch.autograd._profiler_enabled():
            return self._step(closure)
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            args, kwargs = (self, closure), {}
            for pre in (hooks or ((), ()))[0]:
                got = pre(self, args, kwargs)
                if got is not None:
                    if not (isinstance(got, tuple) and len(got) == 2):
                        raise RuntimeError(f"an optimizer step pre-hook must return None or (args, kwargs), got {got!r}")
                    args, kwargs = got
            out = self._step(*args[1:], **kwargs)
            self._optimizer_step_code()
            for post in (hooks or ((), ()))[1]:
                post(self, args, kwargs)
            return out

    step.hooked = True  # type: ignore[attr-defined]  # torch.optim.Optimizer: do not wrap it again

    @torch.no_grad()
    def _step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """:meth:`step` without the hooks."""
        if closure is None:
            raise RuntimeError(
                "EKF.step() needs a closure that returns the error vector ξ = ŷ − y (1-D, one entry per "
                "label) built with an autograd graph; `loss.backward(); opt.step()` is not supported, "
                "because the Kalman filter needs per-label errors and Jacobians, not a loss gradient."
            )
        with torch.enable_grad():
            xi = closure()
            if isinstance(xi, tuple) and len(xi) == 2:  # (ξ, J) from a closed-form Jacobian
                xi, J = xi
                if not (isinstance(J, torch.Tensor) and J.dim() == 2 and J.shape == (xi.numel(), self.n)):
                    got = tuple(J.shape) if isinstance(J, torch.Tensor) else type(J).__name__
                    raise RuntimeError(f"EKF closure returned J of shape {got}, expected ({xi.numel()}, {self.n})")
            else:
                if not isinstance(xi, torch.Tensor) or xi.dim() != 1:
                    shape = tuple(xi.shape) if isinstance(xi, torch.Tensor) else type(xi).__name__
                    raise RuntimeError(
                        f"EKF closure must return the 1-D error vector ξ = ŷ − y (m labels), got {shape}; "
                        "return the per-label errors, not a scalar loss."
                    )
                if not xi.requires_grad:
                    raise RuntimeError("EKF closure returned ξ without an autograd graph (build it with grad enabled)")
                J = flat_jacobian(xi, self._params, vectorize=self.vectorize_jacobian)  # (m, n)
        xi = (xi.detach() if xi.requires_grad else xi).to(self.dtype)  # (m,)
        J = (J.detach() if J.requires_grad else J).to(self.dtype)  # (m, n)
        if not self.label_split:
            xi, J = self._gather(xi, J)
        if self.shard is not None:
            self._update_sharded(xi, J)
        else:
            self._update(xi, J)
        return xi

    def _gather(self, xi: torch.Tensor, J: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Multistream: all-gather ξ (m_r,) and J (m_r, n) of every process, in rank order."""
        if not self.multistream:
            return xi, J
        _, world = process_group_info(self.process_group)
        if world == 1:
            return xi, J
        m = torch.tensor([xi.numel()], device=xi.device, dtype=torch.long)
        ms = [torch.zeros_like(m) for _ in range(world)]
        all_gather(ms, m, self.process_group)
        ms = [int(v.item()) for v in ms]
        mmax = max(ms)
        buf = torch.zeros(mmax, 1 + self.n, dtype=self.dtype, device=xi.device)  # (mmax, 1+n)
        buf[: xi.numel(), 0] = xi
        buf[: xi.numel(), 1:] = J
        out = [torch.empty_like(buf) for _ in range(world)]
        all_gather(out, buf, self.process_group)
        full = torch.cat([o[:k] for o, k in zip(out, ms)])  # (Σm, 1+n)
        return full[:, 0].contiguous(), full[:, 1:].contiguous()

    def _reject(self, why: str) -> None:
        st = self.state[_STATE_KEY]
        st["failures"] += 1
        st["rejected"] += 1
        st["last_error"] = why
        log.warning("EKF: update %d rejected (%s); weights and P unchanged", st["step"], why)
        if st["failures"] >= self.max_failures:
            raise EKFDivergenceError(
                f"EKF: {st['failures']} consecutive updates rejected, last: {why}. Check the labels and "
                "inputs for NaN/inf, lower the learning rate η (lr) or p0."
            )

    def _noise(self) -> float:
        """Observation noise r of R = r·I: 1/η, or λ for the fading-memory filter."""
        st = self.state[_STATE_KEY]
        return float(st["lam"]) if st["lam"] is not None else 1.0 / float(self.param_groups[0]["lr"])

    @torch.no_grad()
    def _update(self, xi: torch.Tensor, J: torch.Tensor) -> None:
        """The filter algebra for given ξ (m,) and J (m, n), both in the filter dtype."""
        st = self.state[_STATE_KEY]
        m = xi.numel()
        if m == 0:
            return
        Ps = st["P"]
        kern = self.kernel
        defer = self.defer_rows > 0
        if not defer:
            self.apply_deferred()
        Ws, c, g = self._deferred, self._c, self._gdiag  # P_b = c (S_b + diag(g_b) − W_bᵀ W_b)
        dS = self._s_diagonal()  # (n,) diag S
        Js = [J[:, a:b].contiguous() for a, b in self.blocks]  # each (m, n_b)
        XTs = [kern.xt(Pb, Jb) for Pb, Jb in zip(Ps, Js)]  # each (m, n_b) = (S_b J_bᵀ)ᵀ
        if self._compiled_update(xi, Js[0], XTs[0], dS, Ps, defer):  # one block on the CPU: the algebra below
            return
        XTs = [XT if W is None else XT - (Jb @ W.T) @ W for XT, Jb, W in zip(XTs, Js, Ws)]
        if g is not None:
            XTs = [XT + Jb * g[a:b] for XT, Jb, (a, b) in zip(XTs, Js, self.blocks)]  # (P_b J_bᵀ)ᵀ / c
        if c != 1.0:
            XTs = [XT * c for XT in XTs]
        A = torch.zeros(m, m, dtype=self.dtype, device=J.device)  # (m, m)
        for Jb, XTb in zip(Js, XTs):
            A.addmm_(Jb, XTb.T)
        A = 0.5 * (A + A.T)
        A.diagonal().add_(self._noise())
        L, info = torch.linalg.cholesky_ex(A)  # (m, m) lower
        Linv = torch.linalg.solve_triangular(L, torch.eye(m, dtype=L.dtype, device=L.device), upper=False)  # (m, m)
        u = Linv @ xi.unsqueeze(1)  # (m, 1) = L⁻¹ ξ
        Vs = [torch.mm(Linv, XTb) for XTb in XTs]  # each (m, n_b) = L⁻¹ X_bᵀ
        # new diagonal of P, checked before P is overwritten: diag P_b − Σ_rows V_b∘V_b, each (n_b,)
        dP = dS if g is None else dS + g  # (n,) diag P / c without the deferred rows
        dmin = torch.stack([(c * (dP[a:b] - (0 if wsq is None else wsq)) - (Vb * Vb).sum(0)).amin()
                            for (a, b), Vb, wsq in zip(self.blocks, Vs, self._wsq)]).amin()
        # one host sync: |V| <= max^(1/4) bounds VᵀV, so P − VᵀV stays finite; NaN fails every comparison
        vmax = torch.stack([Vb.abs().amax() for Vb in Vs]).amax()
        ok = (info == 0) & torch.isfinite(xi).all() & torch.isfinite(u).all() & (vmax <= self._big) & (dmin > 0)
        if self.innovation_gate is not None:
            z = (xi.abs() / A.diagonal().sqrt()).amax()  # largest normalised innovation |ξᵢ|/√Aᵢᵢ
            ok = ok & (z <= self.innovation_gate)
        if not bool(ok):
            return self._reject(self._diagnose(xi, J, info, A, dmin))
        dws = [(Vb.T @ u).squeeze(1) for Vb in Vs]  # each (n_b,) = K_b ξ
        self._finish(Ps, Vs, torch.cat(dws), defer, c)

    def _finish(self, Ps: List[torch.Tensor], Vs: List[torch.Tensor], dw: Optional[torch.Tensor], defer: bool,
                c: float) -> None:
        """After an accepted update: P −= VᵀV (deferred, or now on this process's blocks or, sharded, its rows),
        w −= Δw (None: done already), schedules. Vs: V (m, n_b) of each block."""
        st, kern = self.state[_STATE_KEY], self.kernel
        if defer:
            self._defer(Vs, c)
            faded = True
        elif self.shard is not None:  # own rows: P ← P − Vᵀ V; 1/λ in _advance
            self._sdiag = None  # S changes here
            self.shard.sub_gram_(Ps, Vs[0] if len(Vs) == 1 else torch.cat(Vs, 1))
            faded = False
        else:
            fade = 1.0 / st["lam"] if st["lam"] is not None and kern.fused_scale else None  # P /= λ in the same pass
            self._sdiag = None  # S changes here
            for Pb, Vb in zip(Ps, Vs):
                if fade is None:
                    kern.sub_gram_(Pb, Vb)  # P_b ← P_b − V_bᵀ V_b = (I − K_b J_b) P_b
                else:
                    kern.sub_gram_(Pb, Vb, fade)  # P_b ← (P_b − V_bᵀ V_b)/λ
            faded = fade is not None
        if dw is not None:
            self._apply_dw(dw)
        self._advance(Ps, faded=faded)

    def _compiled_update(self, xi: torch.Tensor, J: torch.Tensor, XT: torch.Tensor, dS: torch.Tensor,
                         Ps: List[torch.Tensor], defer: bool) -> bool:
        """The rest of an update of one block by :func:`ekf_plugin.optim.native.gain` (XT (m, n) = (S Jᵀ)ᵀ becomes V
        in place; then rejected, or finished as :meth:`_finish` does); False where it does not apply (several
        blocks, CUDA, other layouts, no compiler, ``EKF_PLUGIN_NATIVE_GAIN=0``): the caller's torch algebra."""
        if not _NATIVE_GAIN or XT.device.type != "cpu" or len(self.blocks) != 1:
            return False
        from ekf_plugin.optim import native  # noqa: PLC0415 - builds on first use

        c = self._c
        got = native.gain(XT, J, xi, dS, c, self._noise(), self._big, self.innovation_gate, self._deferred[0],
                          self._wsq[0], self._gdiag, weights=self._params)
        if got is None:
            return False
        ok, info, dmin, A, dw, stepped = got
        if stepped:  # w −= Δw was written through pointers: bump the parameters' versions as an in-place update
            increment_version(self._params)  # does (caches key on them), without a pass over the weights
        if not ok:
            self._reject(self._diagnose(xi, J, torch.tensor(info), A, torch.tensor(dmin)))
        else:
            self._finish(Ps, [XT], None if stepped else dw, defer, c)
        return True

    @torch.no_grad()
    def _update_sharded(self, xi: torch.Tensor, J: torch.Tensor) -> None:
        """:meth:`_update` on this process's rows of P (:mod:`ekf_plugin.optim.sharded`); ξ (m,) and J (m, n)
        must be the same on every process. Everything but the two passes over P is computed identically on
        every process from all-reduced X (n, m) and diag P (n,), so the accept decision and Δw agree."""
        st = self.state[_STATE_KEY]
        m = xi.numel()
        if m == 0:
            return
        local = st["P"]
        defer = self.defer_rows > 0
        if not defer:
            self.apply_deferred()
        Ws, c, g = self._deferred, self._c, self._gdiag  # P_b = c (S_b + diag(g_b) − W_bᵀ W_b), as in _update
        check = torch.stack([xi.sum(), J.sum(), xi.new_tensor(float(m))])  # (3,) the same ξ, J everywhere?
        own, kept = self._s_diagonal(), self._sdiag_all  # (n,) own rows' diag S; the whole one while unchanged
        XT, diag = self.shard.xt_and_diag(local, J, own, check, kept)  # (m, n), (n,) of the stored S
        if kept is None:
            self._sdiag_all = diag.clone()  # the same numbers on every process (one all-reduce)
        if self._compiled_update(xi, J, XT, diag, local, defer):  # as in _update; V the same on every process
            return
        diag = diag.clone()  # (n,) the algebra below adds to it in place
        if g is not None:
            XT += J * g  # (m, n)
            diag += g
        if Ws[0] is not None:
            for (a, b), W, wsq in zip(self.blocks, Ws, self._wsq):
                XT[:, a:b] -= (J[:, a:b] @ W.T) @ W  # (m, n_b)
                diag[a:b] -= wsq  # (n_b,) diag(WᵀW)
        if c != 1.0:
            XT, diag = XT * c, diag * c
        A = J @ XT.T  # (m, m)
        A = 0.5 * (A + A.T)
        A.diagonal().add_(self._noise())
        L, info = torch.linalg.cholesky_ex(A)  # (m, m) lower
        Linv = torch.linalg.solve_triangular(L, torch.eye(m, dtype=L.dtype, device=L.device), upper=False)  # (m, m)
        u = Linv @ xi.unsqueeze(1)  # (m, 1) = L⁻¹ ξ
        V = Linv @ XT  # (m, n) = L⁻¹ Xᵀ
        dmin = (diag - (V * V).sum(0)).amin()  # new min diag P
        ok = (info == 0) & torch.isfinite(xi).all() & torch.isfinite(u).all() & (V.abs().amax() <= self._big) & (dmin > 0)
        if self.innovation_gate is not None:
            ok = ok & ((xi.abs() / A.diagonal().sqrt()).amax() <= self.innovation_gate)
        if not bool(ok):
            return self._reject(self._diagnose(xi, J, info, A, dmin))
        # as in _update (deferred: apply_deferred then updates the own rows); K ξ (n,) the same on every process
        Vs = [V] if len(self.blocks) == 1 else [V[:, a:e] for a, e in self.blocks]
        self._finish(local, Vs, (V.T @ u).squeeze(1), defer, c)

    def _defer(self, Vs: List[torch.Tensor], c: float) -> None:
        """Defer P ← (P − VᵀV)/λ = c/λ·(S + diag(g) − [W; V/√c]ᵀ[W; V/√c]) for the accepted rows V_b (m, n_b) of
        each block: append V_b/√c to W_b (rows of a buffer kept between applications, not a new tensor per
        update), fold 1/λ into c, apply the deferred work to S once W has ``defer_rows`` rows."""
        s = 1.0 / math.sqrt(c)
        for b, Vb in enumerate(Vs):
            m, W = Vb.shape[0], self._deferred[b]
            r = 0 if W is None else W.shape[0]
            buf = self._wbuf[b]
            if buf is None or buf.shape[0] < r + m or buf.dtype != Vb.dtype or buf.device != Vb.device:
                grown = Vb.new_empty(max(self.defer_rows + m, r + m), Vb.shape[1])  # (rows, n_b)
                if r:
                    grown[:r] = W
                self._wbuf[b] = buf = grown
            Wn = buf[r : r + m]  # (m, n_b)
            if s == 1.0:
                Wn.copy_(Vb)
            else:
                torch.mul(Vb, s, out=Wn)
            self._deferred[b] = buf[: r + m]  # (r + m, n_b)
            sq = (Wn * Wn).sum(0)  # (n_b,): diag(WᵀW) kept up to date, not recomputed from all r rows per update
            self._wsq[b] = sq if self._wsq[b] is None else self._wsq[b] + sq
        lam = self.state[_STATE_KEY]["lam"]
        if lam is not None:
            self._c = c / lam
        if self._deferred[0].shape[0] >= self.defer_rows:
            self.apply_deferred()

    def _diagnose(self, xi: torch.Tensor, J: torch.Tensor, info: torch.Tensor, A: torch.Tensor, dmin) -> str:
        """Why an update was rejected (slow path, only after a failure)."""
        if not bool(torch.isfinite(xi).all()):
            return "non-finite error vector ξ"
        if not bool(torch.isfinite(J).all()):
            return "non-finite Jacobian J"
        if int(info.item()) != 0:
            return "innovation matrix A = JPJᵀ + R not positive definite"
        if self.innovation_gate is not None:
            z = float((xi.abs() / A.diagonal().sqrt()).amax())
            if not z <= self.innovation_gate:
                return (f"innovation gate: normalised innovation |ξ|/√A = {z:.3g} > {self.innovation_gate:g} "
                        "(an outlier label, or a model far from the data)")
        if bool(torch.isfinite(dmin)) and float(dmin) <= 0:
            return (f"P would lose positive definiteness (new min diag P = {float(dmin):.3g}); lower η (lr) "
                    "or use a float64 P")
        return "non-finite or overflowing Kalman gain K"

    def _apply_dw(self, dw: torch.Tensor) -> None:
        """w ← w − Kξ (dw = Kξ, shape (n,), filter dtype) written into the parameters."""
        p0 = self._params[0]
        if all(p.dtype == p0.dtype and p.device == p0.device for p in self._params):
            # one cast and one multi-tensor subtraction (12 tensors of the water BPNN: 0.03 against 0.12 ms)
            parts = dw.to(device=p0.device, dtype=p0.dtype).split([p.numel() for p in self._params])
            torch._foreach_sub_(self._params, [d.view_as(p) for d, p in zip(parts, self._params)])
            return
        off = 0
        for p in self._params:
            k = p.numel()
            p.sub_(dw[off : off + k].view_as(p).to(device=p.device, dtype=p.dtype))
            off += k

    def _advance(self, Ps: List[torch.Tensor], faded: bool = False) -> None:
        """Fading memory, process noise, symmetrisation and schedules after an accepted update (``faded``:
        the kernel has already divided P by λ)."""
        st = self.state[_STATE_KEY]
        lam = st["lam"]
        if lam is not None:
            if not faded:  # P = S here (immediate updates): S /= λ
                self.apply_deferred()
                for Pb in Ps:
                    Pb.div_(lam)
                self._sdiag = None
            st["lam"] = self.fading_nu * lam + 1.0 - self.fading_nu
        if st["q"] > 0:  # P + qI = c (S + diag(g + q/c) − WᵀW): added to S with the deferred rows
            if self._gdiag is None:
                self._gdiag = torch.zeros(self.n, dtype=self.dtype, device=Ps[0].device)  # (n,)
            self._gdiag += st["q"] / self._c
        st["step"] += 1
        st["failures"] = 0
        if self.symmetrize_every and not self.kernel.triangular and st["step"] % self.symmetrize_every == 0:
            self.apply_deferred()
            for Pb in Ps if self.shard is None else self.shard.diagonal_blocks(Ps):  # the blocks that hold diag P
                Pb.copy_(0.5 * (Pb + Pb.T))
            self._sdiag = None
        st["q"] = max(st["q"] * self.q_decay, self.q_min) if self.q0 > 0 else 0.0
        if self.eta_growth != 1.0:
            for g in self.param_groups:
                g["lr"] = min(g["lr"] * self.eta_growth, self.eta_max)

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self) -> Dict[str, float]:
        """n2p2-style status: mean ``|diag P|``, min ``diag P``, mean ``|offdiag P|`` (first block), η, q, step."""
        st = self.ekf_state
        blocks = self._full_blocks() if self.shard is not None else st["P"]  # sharded: collective
        diag = torch.cat([Pb.diagonal() for Pb in blocks])
        P0 = self.kernel.full(blocks[0]) if self.shard is None else blocks[0]
        nb = P0.shape[0]
        off = (P0.abs().sum() - P0.diagonal().abs().sum()) / max(nb * nb - nb, 1)
        return {
            "ekf_step": float(st["step"]),
            "ekf_diagP_mean": float(diag.abs().mean()),
            "ekf_diagP_min": float(diag.min()),
            "ekf_offdiagP_mean": float(off),
            "ekf_eta": float(self.param_groups[0]["lr"]),
            "ekf_q": float(st["q"]),
            "ekf_rejected": float(st["rejected"]),
        }


def _message_bytes(n: int, dtype: torch.dtype) -> int:
    """Shared-memory slot size for an EKF over n weights: X = P Jᵀ with diag P for up to 20 labels, or 21 label
    rows, in the filter dtype (larger messages go through ``torch.distributed``), at most 8 MiB."""
    return min(21 * (n + 3) * max(torch.finfo(dtype).bits // 8, 8), 8 * 2**20)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)
