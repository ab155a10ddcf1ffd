"""Dense linear algebra of one EKF block: X = P Jᵀ and P −= Vᵀ V (plain torch, optional SciPy BLAS).

The filter touches P twice per update: it reads P to form X = P Jᵀ and reads and writes P to subtract
the symmetric low-rank term Vᵀ V. For the study's water BPNN (n = 2827, P = 64 MB in float64) these two
passes are the whole cost of an update, so how they are done matters:

* :class:`TorchKernel` (any device): ``torch.mm`` and ``addmm_``/``addr_`` on the full block.
* :class:`BlasKernel` (CPU tensors): the symmetric BLAS routines ``?symm``/``?symv`` (X = P Jᵀ; on one thread
  the compiled product :func:`ekf_plugin.optim.native.thin_xt` instead, unless ``EKF_PLUGIN_NATIVE_XT=0``:
  n = 2827, float64, m = 1: 1.37 against 1.57 ms for ``?symv``, m = 10: 4.7 against 9 ms for ``?symm``) and
  ``?syrk``/``?syr`` (P −= Vᵀ V) from SciPy, called on the torch storage without a copy. They read and
  write only one triangle of P (the *upper* triangle of the row-major torch tensor, i.e. the lower
  triangle of its column-major view), which halves the memory traffic; on this project's 2-core CPU
  they are 2.5–4× faster than the full-matrix torch calls (``benchmarks/bench_ekf.py``). The other
  triangle is left stale; :meth:`FilterKernel.full` returns the symmetric block.

Shapes: P (n_b, n_b), J_b (m, n_b), X (m, n_b) (returned transposed, row per label), V (m, n_b).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

__all__ = ["FilterKernel", "TorchKernel", "BlasKernel", "select_kernel", "KERNELS", "symmetric_from_upper"]

KERNELS = ("auto", "blas", "torch", "native")
NATIVE_XT = os.environ.get("EKF_PLUGIN_NATIVE_XT", "1") != "0"  # BlasKernel: compiled X = P Jᵀ on one thread


class FilterKernel:
    """The two P passes of an update. ``triangular``: only the upper triangle of P is kept valid."""

    name = "abstract"
    triangular = False
    fused_scale = False  # sub_gram_(P, V, scale) also applies P *= scale (the fading memory's 1/λ) in its pass

    def xt(self, P: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
        """(m, n_b) = (P Jᵀ)ᵀ for P (n_b, n_b) and J (m, n_b), both in the filter dtype."""
        raise NotImplementedError

    def sub_gram_(self, P: torch.Tensor, V: torch.Tensor) -> None:
        """In place P ← P − Vᵀ V for V (m, n_b)."""
        raise NotImplementedError

    def rect_xt(self, R: torch.Tensor, Jl: torch.Tensor, Jr: torch.Tensor):
        """((R Jrᵀ)ᵀ (m, h), Jl R (m, w)) for a rectangle R (h, w) of P right of a diagonal block (the sharded
        filter, :mod:`ekf_plugin.optim.sharded`), Jl (m, h), Jr (m, w): its two contributions to X = P Jᵀ."""
        return Jr @ R.T, Jl @ R  # (m, h), (m, w)

    def rect_sub_gram_(self, R: torch.Tensor, Vl: torch.Tensor, Vr: torch.Tensor) -> None:
        """In place R ← R − Vlᵀ Vr for a rectangle R (h, w) of P right of a diagonal block (the sharded filter's
        part of P −= Vᵀ V), Vl (m, h) and Vr (m, w) the columns of V of its rows and of its columns."""
        if Vl.shape[0] == 1:
            R.addr_(Vl[0], Vr[0], alpha=-1.0)  # rank 1
        else:
            R.addmm_(Vl.T, Vr, alpha=-1.0)  # (h, w)

    def full(self, P: torch.Tensor) -> torch.Tensor:
        """The symmetric block (a new tensor when the kernel keeps one triangle, else P itself)."""
        return P

    def diagonal(self, P: torch.Tensor) -> torch.Tensor:
        """(n_b,) view of diag P (valid under every kernel)."""
        return P.diagonal()


class TorchKernel(FilterKernel):
    """Full-matrix torch calls; any device and dtype."""

    name = "torch"

    def xt(self, P: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
        return torch.mm(J, P)  # (m, n_b) = J P = (P Jᵀ)ᵀ, P symmetric

    def sub_gram_(self, P: torch.Tensor, V: torch.Tensor) -> None:
        if V.shape[0] == 1:
            P.addr_(V[0], V[0], alpha=-1.0)  # rank 1
        else:
            P.addmm_(V.T, V, alpha=-1.0)  # (n_b, n_b)


def symmetric_from_upper(P: torch.Tensor, tile: int = 128) -> torch.Tensor:
    """A new symmetric (n, n) tensor from the upper triangle of P (n, n) (its lower triangle is ignored).

    Strips of ``tile`` rows at a time: the part left of each diagonal tile is the transpose of the column strip
    above it, so every transposed read stays within a few hundred KB. ``triu(P) + triu(P, 1).T`` reads the whole
    matrix column-wise instead: 242 against 58 ms for n = 2827 float64 on one core (a checkpoint of the study's
    BPNN writes P this way every 1000 updates).
    """
    out = P.clone()  # (n, n)
    n = P.shape[0]
    for i in range(0, n, tile):
        e = min(i + tile, n)
        out[i:e, :i].copy_(P[:i, i:e].T)  # (e − i, i) lower strip ← transposed upper strip
        d = P[i:e, i:e]  # (e − i, e − i) diagonal tile
        out[i:e, i:e] = torch.triu(d) + torch.triu(d, 1).T
    return out


class BlasKernel(FilterKernel):
    """SciPy symmetric BLAS on the upper triangle of CPU blocks (module docstring)."""

    name = "blas"
    triangular = True

    def __init__(self) -> None:
        from scipy.linalg import blas  # noqa: PLC0415 - optional accelerator

        self._blas = blas
        self._threads = _scipy_blas_threads()

    def _call(self, fn, *args, **kw):
        """Run a BLAS routine with as many threads as torch uses (``torch.get_num_threads()``); SciPy's
        OpenBLAS otherwise starts one thread per core, which on a busy machine is several times slower.
        The previous thread count is restored, so nothing changes for other users of SciPy."""
        ctl = self._threads
        if ctl is None:
            return fn(*args, **kw)
        want, before = torch.get_num_threads(), ctl.num_threads
        if want == before:
            return fn(*args, **kw)
        ctl.set_num_threads(want)
        try:
            return fn(*args, **kw)
        finally:
            ctl.set_num_threads(before)

    def _fn(self, name: str, P: torch.Tensor):
        return getattr(self._blas, ("d" if P.dtype == torch.float64 else "s") + name)

    @staticmethod
    def _colmajor(P: torch.Tensor):
        """Column-major numpy view of the row-major block (its transpose; the same memory)."""
        if not P.is_contiguous():
            raise ValueError("BlasKernel needs contiguous P blocks")
        return P.numpy().T  # (n_b, n_b) F-contiguous; its lower triangle = P's upper triangle

    def xt(self, P: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
        if torch.get_num_threads() == 1 and NATIVE_XT:  # one thread: the compiled product
            from .native import thin_xt  # noqa: PLC0415

            X = thin_xt(P, J)  # (m, n_b), or None where it cannot be built
            if X is not None:
                return X
        return self._blas_xt(P, J)

    def rect_xt(self, R: torch.Tensor, Jl: torch.Tensor, Jr: torch.Tensor):
        """One pass over R by the compiled kernel on one thread (:func:`ekf_plugin.optim.native.rect_xt`; the
        two torch products read R twice, and MKL's skinny GEMM is 3x slower than OpenBLAS's on AMD CPUs)."""
        if torch.get_num_threads() == 1 and NATIVE_XT:
            from .native import rect_xt  # noqa: PLC0415

            out = rect_xt(R, Jl, Jr)
            if out is not None:
                return out
        return super().rect_xt(R, Jl, Jr)

    def _blas_xt(self, P: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
        """X by ``?symv``/``?symm`` (the module docstring's BLAS path)."""
        C = self._colmajor(P)
        J = J.contiguous()  # (m, n_b)
        if J.shape[0] == 1:
            x = self._call(self._fn("symv", P), 1.0, C, J.numpy()[0], lower=1)  # (n_b,)
            return torch.from_numpy(x).unsqueeze(0)  # (1, n_b)
        X = self._call(self._fn("symm", P), 1.0, C, J.numpy().T, side=0, lower=1)  # (n_b, m) column-major
        return torch.from_numpy(X.T)  # (m, n_b) row-major, no copy

    def sub_gram_(self, P: torch.Tensor, V: torch.Tensor) -> None:
        C = self._colmajor(P)
        V = V.contiguous()  # (m, n_b)
        if V.shape[0] == 1:
            out = self._call(self._fn("syr", P), -1.0, V.numpy()[0], lower=1, a=C, overwrite_a=1)
        else:
            out = self._call(self._fn("syrk", P), -1.0, V.numpy().T, beta=1.0, c=C, trans=0, lower=1, overwrite_c=1)
        if out.ctypes.data != C.ctypes.data:  # SciPy had to copy: write back (not expected for F-order C)
            C[...] = out

    def rect_sub_gram_(self, R: torch.Tensor, Vl: torch.Tensor, Vr: torch.Tensor) -> None:
        """``?gemm`` on R's column-major view (Rᵀ −= Vrᵀ Vl), like the diagonal blocks' ``?syrk``: in a 2-process
        ``spktrain`` run (n = 2827, float64, ~35 deferred rows, the other process in its ``?syrk`` at the same
        time) the process that holds the rectangle spent 3.5–3.7 ms on its share of P −= Vᵀ V (its triangle and the
        rectangle) with torch's ``addmm_`` (MKL) against 3.0–3.2 ms with this; the other process's share 3.0–3.3 ms."""
        if Vl.shape[0] == 1 or not R.is_contiguous():
            super().rect_sub_gram_(R, Vl, Vr)
            return
        C = R.numpy().T  # (w, h) F-contiguous: Rᵀ, the same memory
        Vr_t = Vr.contiguous().numpy().T  # (w, m) F-contiguous
        out = self._call(self._fn("gemm", R), -1.0, Vr_t, Vl.contiguous().numpy(), beta=1.0, c=C, overwrite_c=1)
        if out.ctypes.data != C.ctypes.data:  # SciPy had to copy: write back (not expected for F-order C)
            C[...] = out

    def full(self, P: torch.Tensor) -> torch.Tensor:
        return symmetric_from_upper(P)  # (n_b, n_b) symmetric, a new tensor


class _OpenBLASThreads:
    """get/set the thread count of the OpenBLAS that ``scipy.linalg.blas`` calls (threadpoolctl)."""

    def __init__(self, controller) -> None:
        self._c = controller

    @property
    def num_threads(self) -> int:
        return int(self._c.get_num_threads())

    def set_num_threads(self, n: int) -> None:
        self._c.set_num_threads(int(n))


def _scipy_blas_threads() -> Optional[_OpenBLASThreads]:
    """Thread control of SciPy's own BLAS, or None (no threadpoolctl, or not an OpenBLAS)."""
    try:
        import scipy.linalg  # noqa: F401, PLC0415
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415
    except ImportError:
        return None
    libs = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
    scipy_libs = [c for c in libs if "scipy" in str(c.filepath) and "numpy.libs" not in str(c.filepath)]  # not numpy's copy
    chosen = scipy_libs or libs
    return _OpenBLASThreads(chosen[0]) if chosen and hasattr(chosen[0], "get_num_threads") else None


def _blas_available() -> bool:
    try:
        import scipy.linalg.blas  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def select_kernel(name: str, device: torch.device, dtype: torch.dtype) -> FilterKernel:
    """The kernel for ``name`` ∈ {"auto", "blas", "torch", "native"} and the blocks' device and dtype.

    ``"auto"``: BLAS for CPU float32/float64 blocks when SciPy is importable, else torch. ``"blas"`` on a
    non-CPU device or without SciPy raises ValueError. ``"native"``: the compiled thin-update kernel of
    :mod:`ekf_plugin.optim.native` for CPU blocks; where it cannot be built (no C compiler) or the blocks
    are not on the CPU, ``"auto"``'s choice with a warning.
    """
    if name not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {name!r}")
    cpu = torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64)
    if name == "native":
        from ekf_plugin.optim import native  # noqa: PLC0415

        if cpu and _blas_available() and native.load() is not None:
            return native.NativeKernel()
        why = native.last_error() if cpu else f"{dtype} blocks on {device}"
        warnings.warn(f"kernel='native' is not available ({why or 'no SciPy'}); using kernel='auto'", stacklevel=3)
        return select_kernel("auto", device, dtype)
    if name == "torch" or (name == "auto" and not (cpu and _blas_available())):
        return TorchKernel()
    if not cpu:
        raise ValueError(f"kernel='blas' needs float32/float64 blocks on the CPU, got {dtype} on {device}")
    if not _blas_available():
        raise ValueError("kernel='blas' needs SciPy (pip install scipy) or use kernel='torch'")
    return BlasKernel()

