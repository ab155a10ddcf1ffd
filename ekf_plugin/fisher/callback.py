"""Lightning callback: the Fisher spectrum of the L1 loss on fixed validation labels during training.

At the first validation epoch, and then whenever ``every_n_epochs`` epochs have passed since the last
computation, it computes the spectrum on a fixed,
seeded random subset of validation labels (:func:`ekf_plugin.fisher.labels.sample_labels`), logs summary
scalars, and writes ``epoch_XXXX.npz`` + ``epoch_XXXX.png`` into ``dirpath``. Between computations it
logs the latest values again, so the keys are present at every validation epoch and can be monitored
by ``ModelCheckpoint``/``EarlyStopping``. Logged keys (``prefix='fisher'``)::

    fisher/log10_median  fisher/log10_mean  fisher/log10_max  fisher/effective_rank  fisher/rank
    fisher/energy/<stat>  fisher/forces/<stat>    (for kind='both'; one of them for 'energy'/'forces')
    fisher/epoch                                  (epoch of the values logged)

The study found larger eigenvalues (about ×10 at the peak) for the better, EKF-trained potentials,
so select with ``mode: max``. Config (``spktrain ... +callbacks=fisher``)::

    fisher_spectrum:
      _target_: ekf_plugin.fisher.FisherSpectrumCallback
      n_labels: 200
      kind: both
      every_n_epochs: 1
      seed: 0
      dirpath: fisher
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from ..labels import N_ATOMS
from .compute import fisher_spectrum, trainable_parameters
from .labels import KINDS, LabelSet, sample_labels, split_counts
from .spectrum import METHODS, STATS, FisherSpectrum



def metric_names(prefix: str = "fisher", kind: str = "both") -> List[str]:
    """Every key the callback logs for ``kind``."""
    groups = [""] + {"both": ["energy", "forces"], "energy": ["energy"], "forces": ["forces"]}[kind]
    names = [f"{prefix}/{g + '/' if g else ''}{s}" for g in groups for s in STATS]
    return names + [f"{prefix}/epoch"]


class FisherSpectrumCallback(pl.Callback):
    """Fisher-information spectrum on fixed validation labels, logged for model selection.

    Args:
        n_labels: number of labels N (energy + force components), ≥ 1.
        kind: 'energy', 'forces' or 'both' (split by ``energy_fraction``).
        every_n_epochs: compute at the first validation epoch, then once ≥ k epochs have passed (k ≥ 1).
        seed: seed of the label subset (fixed for the whole run, kept through resume).
        energy_fraction: share of energy labels for kind='both'.
        forces_per_structure: force components drawn per validation structure.
        energy_key, forces_key: output/target names.
        energy_per_atom: energy labels in eV/atom (default) rather than eV.
        batch_size, chunk_size: structures per forward pass, Jacobian rows per backward (memory knobs).
        method: 'auto' (cheaper of JJᵀ, JᵀJ), 'JJt' or 'JtJ'.
        dirpath: folder for the npz/PNG files (relative paths are resolved against the working directory at
            setup, which is the run directory under ``spktrain``).
        prefix: first part of the logged keys.
        save_plots: write a PNG histogram per computation.

    Raises:
        ValueError: on bad arguments, and at setup when a ``ModelCheckpoint``/``EarlyStopping`` monitors a
            ``<prefix>/...`` key that this callback does not log.
    """

    def __init__(
        self,
        n_labels: int = 200,
        kind: str = "both",
        every_n_epochs: int = 1,
        seed: int = 0,
        energy_fraction: float = 0.5,
        forces_per_structure: int = 10,
        energy_key: str = "energy",
        forces_key: str = "forces",
        energy_per_atom: bool = True,
        batch_size: int = 8,
        chunk_size: int = 64,
        method: str = "auto",
        dirpath: str = "fisher",
        prefix: str = "fisher",
        save_plots: bool = True,
    ) -> None:
        super().__init__()
        split_counts(n_labels, kind, energy_fraction)  # validates n_labels, kind, energy_fraction
        for name, value in (("every_n_epochs", every_n_epochs), ("forces_per_structure", forces_per_structure),
                            ("batch_size", batch_size), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not prefix or not isinstance(prefix, str) or prefix.endswith("/"):
            raise ValueError(f"prefix must be a non-empty string without a trailing '/', got {prefix!r}")
        self.n_labels, self.kind, self.every_n_epochs, self.seed = n_labels, kind, every_n_epochs, seed
        self.energy_fraction, self.forces_per_structure = energy_fraction, forces_per_structure
        self.energy_key, self.forces_key, self.energy_per_atom = energy_key, forces_key, energy_per_atom
        self.batch_size, self.chunk_size, self.method = batch_size, chunk_size, method
        self.dirpath, self.prefix, self.save_plots = Path(dirpath), prefix, save_plots
        self.labels: Optional[LabelSet] = None
        self.last_metrics: Dict[str, float] = {}
        self.last_epoch: int = -1
        self.history: List[Dict[str, float]] = []
        self._structures: Dict[int, Any] = {}

    # ----------------------------------------------------------------- state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @property
    def metric_names(self) -> List[str]:
        return metric_names(self.prefix, self.kind)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "labels": self.labels.state() if self.labels is not None else None,
            "last_metrics": dict(self.last_metrics),
            "last_epoch": self.last_epoch,
            "history": list(self.history),
            "settings": {"n_labels": self.n_labels, "kind": self.kind, "seed": self.seed},
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved = state_dict.get("settings", {})
        mine = {"n_labels": self.n_labels, "kind": self.kind, "seed": self.seed}
        if saved and saved != mine:
            rank_zero_warn(f"FisherSpectrumCallback: resuming with {mine}, but the checkpoint's labels were drawn with "
                           f"{saved}; keeping the checkpoint's labels so the spectra stay comparable")
        labels = state_dict.get("labels")
        self.labels = LabelSet(labels["structure"], labels["component"]) if labels else None
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
        self.last_epoch = int(state_dict.get("last_epoch", -1))
        self.history = list(state_dict.get("history", []))
        self._structures = {}

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if not self.dirpath.is_absolute():
            self.dirpath = Path.cwd() / self.dirpath
        known = set(self.metric_names)
        for cb in trainer.callbacks:
            monitor = getattr(cb, "monitor", None)
            if isinstance(monitor, str) and monitor.startswith(self.prefix + "/") and monitor not in known:
                raise ValueError(
                    f"{type(cb).__name__}(monitor={monitor!r}): FisherSpectrumCallback(prefix={self.prefix!r}, "
                    f"kind={self.kind!r}) logs no such key. Available: {', '.join(sorted(known))}"
                )

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        if not self.last_metrics or epoch - self.last_epoch >= self.every_n_epochs:
            self._compute(trainer, pl_module, epoch)
        for name, value in self.last_metrics.items():
            pl_module.log(name, float(value), on_step=False, on_epoch=True, prog_bar=False, logger=True)
        pl_module.log(f"{self.prefix}/epoch", float(self.last_epoch), on_step=False, on_epoch=True, logger=True)

    # ----------------------------------------------------------------- work
    def _val_loader(self, trainer: "pl.Trainer"):
        loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None or not hasattr(loaders, "dataset"):
            raise RuntimeError("FisherSpectrumCallback needs a validation DataLoader with a .dataset")
        return loaders

    def _structure(self, dataset, s: int):
        if s not in self._structures:
            self._structures[s] = dataset[s]
        return self._structures[s]

    def _ensure_labels(self, dataset) -> LabelSet:
        if self.labels is None:
            self.labels = sample_labels(
                len(dataset), lambda s: int(self._structure(dataset, s)[N_ATOMS].reshape(-1)[0]), self.n_labels,
                self.kind, self.seed, self.energy_fraction, self.forces_per_structure,
            )
        elif len(self.labels) and int(self.labels.structure.max()) >= len(dataset):
            raise ValueError(
                f"the saved Fisher labels refer to structure {int(self.labels.structure.max())}, but the validation "
                f"set has {len(dataset)} structures: resume with the same data split"
            )
        return self.labels

    def _compute(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch: int) -> None:
        loader = self._val_loader(trainer)
        labels = self._ensure_labels(loader.dataset)
        structures = {s: self._structure(loader.dataset, s) for s in labels.structures()}
        from ekf_plugin.bpnn.label_predictor import supports as supports_fast_labels

        inner = getattr(pl_module, "model", None)
        if inner is not None and supports_fast_labels(inner):  # BPNN: rows through the networks only
            model, forward = inner, None
        else:
            model, forward = pl_module, getattr(pl_module, "predict_without_postprocessing", None) or pl_module
        t0 = time.perf_counter()
        spectrum = fisher_spectrum(
            model, structures, labels, forward=forward, params=trainable_parameters(pl_module),
            collate=loader.collate_fn, energy_key=self.energy_key, forces_key=self.forces_key,
            energy_per_atom=self.energy_per_atom, batch_size=self.batch_size, chunk_size=self.chunk_size,
            method=self.method, device=pl_module.device,
        )
        spectrum.meta.update({"epoch": epoch, "seed": self.seed, "global_step": trainer.global_step})
        self.last_metrics = spectrum.metrics(self.prefix)
        self.last_epoch = epoch
        self.history.append({"epoch": epoch, "seconds": time.perf_counter() - t0, **self.last_metrics})
        self._write(spectrum, epoch)

    @rank_zero_only
    def _write(self, spectrum: FisherSpectrum, epoch: int) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        spectrum.save(self.dirpath / f"epoch_{epoch:04d}.npz")
        if self.save_plots:
            from .plot import plot_spectrum

            plot_spectrum(spectrum, self.dirpath / f"epoch_{epoch:04d}.png",
                          title=f"epoch {epoch}: {spectrum.n_weights} weights, {spectrum.n_labels['all']} labels")
        with open(self.dirpath / "history.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(self.history[-1]))
            writer.writeheader()
            writer.writerows(self.history)
        s = spectrum.summary("all")
        rank_zero_info(
            f"[fisher] epoch {epoch}: log10 median {s['log10_median']:.3f}, max {s['log10_max']:.3f}, "
            f"effective rank {s['effective_rank']:.1f} ({spectrum.method}, {spectrum.seconds:.2f} s)"
        )
