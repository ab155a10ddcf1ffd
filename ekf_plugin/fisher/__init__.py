"""Fisher information of the L1 loss: spectra of trained models and a Lightning callback.

The study (Shao et al. 2021, Fig. 9) separates good from bad potentials by the eigenvalue spectrum of
the empirical Fisher information ⟨(∇_w L1)^{⊗2}⟩ where validation errors cannot. Public names::

    from ekf_plugin.fisher import fisher_spectrum, sample_labels, FisherSpectrum, FisherSpectrumCallback

Names are resolved lazily: importing this package does not import Lightning or matplotlib.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "fisher_spectrum": ("ekf_plugin.fisher.compute", "fisher_spectrum"),
    "trainable_parameters": ("ekf_plugin.fisher.compute", "trainable_parameters"),
    "force_graph": ("ekf_plugin.fisher.compute", "force_graph"),
    "LabelSet": ("ekf_plugin.fisher.labels", "LabelSet"),
    "sample_labels": ("ekf_plugin.fisher.labels", "sample_labels"),
    "FisherSpectrum": ("ekf_plugin.fisher.spectrum", "FisherSpectrum"),
    "GramAccumulator": ("ekf_plugin.fisher.spectrum", "GramAccumulator"),
    "summarize": ("ekf_plugin.fisher.spectrum", "summarize"),
    "FisherSpectrumCallback": ("ekf_plugin.fisher.callback", "FisherSpectrumCallback"),
    "metric_names": ("ekf_plugin.fisher.callback", "metric_names"),
    "plot_spectra": ("ekf_plugin.fisher.plot", "plot_spectra"),
    "plot_spectrum": ("ekf_plugin.fisher.plot", "plot_spectrum"),
    "frames_to_structures": ("ekf_plugin.fisher.structures", "frames_to_structures"),
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ekf_plugin.fisher' has no attribute {name!r}")
