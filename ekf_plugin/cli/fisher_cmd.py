"""Compare trained models by the Fisher spectrum of the L1 loss on the same labels (the study's Fig. 9).

    ekf-plugin fisher runs/ekf/best_model runs/adam/best_model --data val.extxyz --labels 1000 --out fisher_cmp

Writes ``fisher_overlay.png`` (one curve per model, all labels), ``fisher_overlay_<group>.png`` per label
group, ``fisher_table.csv``/``.json`` (one row per model) and ``<name>.npz`` spectra into ``--out``, and
prints the table. Models: anything ``ekf_plugin.models.load_model`` reads (spktrain ``best_model``, our
export format, n2p2 directories). Data: an ASE-readable file (extxyz, ASE db, ...); positions in Å unless
``--length-unit`` says otherwise. Targets are not needed: the L1 Fisher does not depend on them.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from . import default_model_name

NAME = "fisher"
HELP = "compare trained models by their Fisher-information spectrum on the same labels"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", type=Path, help="model files or n2p2 directories")
    parser.add_argument("--data", type=Path, required=True, help="structures: extxyz, ASE db or any ASE-readable file")
    parser.add_argument("--index", default=":", help="ASE index of the frames to use (default ':')")
    parser.add_argument("--length-unit", default="Angstrom",
                        help="length unit of the data file, an ase.units name such as Bohr (default Angstrom)")
    parser.add_argument("--labels", type=int, default=200, help="number of labels N (default 200)")
    parser.add_argument("--kind", choices=("energy", "forces", "both"), default="both", help="label kind (default both)")
    parser.add_argument("--energy-fraction", type=float, default=0.5, help="share of energy labels for --kind both")
    parser.add_argument("--forces-per-structure", type=int, default=10, help="force components per structure")
    parser.add_argument("--energy-per-structure", action="store_true", help="energy labels in eV, not eV/atom")
    parser.add_argument("--seed", type=int, default=0, help="seed of the label subset (default 0)")
    parser.add_argument("--names", default=None, help="comma-separated names for the models (default: file names)")
    parser.add_argument("--method", choices=("auto", "JJt", "JtJ"), default="auto", help="eigen route (default auto)")
    parser.add_argument("--float64", action="store_true", help="evaluate models in float64 (more exact small eigenvalues)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the cores the load average leaves idle, at least 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="structures per forward pass")
    parser.add_argument("--chunk-size", type=int, default=32, help="Jacobian rows per backward pass")
    parser.add_argument("--out", type=Path, default=Path("fisher_compare"), help="output folder (default fisher_compare)")
    parser.add_argument("--trust-model", action="store_true",
                        help="allow a full unpickle of a best_model that needs classes outside the allow-list: "
                             "this can run code from the file, use it only for files you trust")


def read_frames(path: Path, index: str = ":", length_unit: str = "Angstrom"):
    """Frames of ``path`` with positions and cell in Å.

    extxyz and n2p2 ``input.data`` files go through :mod:`ekf_plugin.data` (which converts units);
    anything else (ASE db, ...) through ``ase.io.read``, scaled by ``length_unit``. Targets are dropped:
    the L1 Fisher does not depend on them.
    """
    import ase.io
    from ase.io.formats import string2index

    from ekf_plugin.units import length_factor

    scale = length_factor(length_unit)  # Å per unit; ValueError names the known units
    if not path.exists():
        raise SystemExit(f"error: no data file {path}")
    if path.suffix in (".xyz", ".extxyz") or path.name.endswith(".data"):
        from ekf_plugin.data import read_frames as read_known

        fmt = "n2p2" if path.name.endswith(".data") else "extxyz"
        frames = read_known(path, fmt=fmt, length_unit=length_unit, energy_unit="eV")
        frames = frames[string2index(index)]
        frames = frames if isinstance(frames, list) else [frames]
    else:
        frames = ase.io.read(str(path), index=index)
        frames = frames if isinstance(frames, list) else [frames]
        for atoms in frames:
            if scale != 1.0:
                atoms.set_cell(atoms.cell.array * scale, scale_atoms=False)
                atoms.positions = atoms.positions * scale
    for atoms in frames:
        atoms.calc = None
    return frames


def _load(path: Path, dtype, device, trust_pickle: bool = False):
    """The model at ``path``; an unreadable, empty, truncated or untrusted file ends the command with one line."""
    from ekf_plugin.models import load_model

    try:
        return load_model(path, device=device, dtype=dtype, stress=False, trust_pickle=trust_pickle)
    except (ValueError, OSError) as exc:  # ModelLoadError/UntrustedModelError are ValueErrors
        raise SystemExit(f"error: {exc}") from None


def _cutoff(model) -> float:
    from ekf_plugin.models import model_cutoff

    return model_cutoff(model)


def _row(name: str, spectrum) -> dict:
    row = {"model": name, "n_weights": spectrum.n_weights, "n_labels": spectrum.n_labels["all"],
           "method": spectrum.method, "seconds": round(spectrum.seconds, 3), **spectrum.summary("all")}
    for g in ("energy", "forces"):
        if g in spectrum.eigenvalues:
            row.update({f"{g}_{k}": v for k, v in spectrum.summary(g).items() if k.startswith("log10")})
    return row


def _print_table(rows) -> None:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(width[c]) for c in cols))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run(args: argparse.Namespace) -> int:
    import torch

    from ekf_plugin.fisher.compute import fisher_spectrum
    from ekf_plugin.fisher.labels import sample_labels
    from ekf_plugin.fisher.plot import plot_spectra
    from ekf_plugin.fisher.structures import frames_to_structures
    from ekf_plugin.progress import progress_bar

    from ekf_plugin.evaluation import idle_cores, set_threads

    if args.labels < 1:
        raise SystemExit("error: --labels must be >= 1")
    try:
        set_threads(args.threads if args.threads is not None else idle_cores())
    except ValueError as exc:
        raise SystemExit(f"error: --threads: {exc}") from None
    names = args.names.split(",") if args.names else [default_model_name(p) for p in args.models]
    if len(names) != len(args.models) or len(set(names)) != len(names):
        raise SystemExit(f"error: need {len(args.models)} distinct names, got {names}")
    for path in args.models:  # fail on a bad model file before the long work starts
        _load(path, None, "cpu", args.trust_model)
    try:
        frames = read_frames(args.data, args.index, args.length_unit)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    labels = sample_labels(len(frames), lambda s: len(frames[s]), args.labels, args.kind, args.seed,
                           args.energy_fraction, args.forces_per_structure)
    print(f"[fisher] {len(labels)} labels ({labels.n_energy} energy, {labels.n_forces} force components) "
          f"from {len(labels.structures())} of {len(frames)} structures in {args.data}, seed {args.seed}")
    dtype = torch.float64 if args.float64 else None
    args.out.mkdir(parents=True, exist_ok=True)
    rows, spectra, cache = [], {}, {}
    for name, path in zip(names, args.models):
        model = _load(path, dtype, args.device, args.trust_model)
        in_dtype = next(p for p in model.parameters()).dtype
        key = (_cutoff(model), in_dtype)
        if key not in cache:
            chosen = labels.structures()
            built = frames_to_structures([frames[s] for s in chosen], key[0], dtype=in_dtype)
            cache[key] = dict(zip(chosen, built))
        with progress_bar(total=len(labels), desc=name, unit="label", leave=False) as bar:
            spectrum = fisher_spectrum(
                model, cache[key], labels, energy_per_atom=not args.energy_per_structure,
                batch_size=args.batch_size, chunk_size=args.chunk_size, method=args.method, device=args.device,
                progress=lambda k: bar.update(k - bar.n),
            )
        spectrum.meta.update({"model": str(path), "seed": args.seed, "data": str(args.data)})
        spectrum.save(args.out / f"{name}.npz")
        spectra[name] = spectrum
        rows.append(_row(name, spectrum))
    plot_spectra({n: s.nonzero("all") for n, s in spectra.items()}, args.out / "fisher_overlay.png",
                 title=f"Fisher spectra, {len(labels)} labels ({args.kind}), {args.data.name}")
    for g in ("energy", "forces"):
        if all(g in s.eigenvalues for s in spectra.values()) and args.kind == "both":
            plot_spectra({n: s.nonzero(g) for n, s in spectra.items()}, args.out / f"fisher_overlay_{g}.png",
                         title=f"Fisher spectra, {g} labels")
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out / "fisher_table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "fisher_table.json").write_text(json.dumps(rows, indent=2))
    _print_table(rows)
    print(f"[fisher] wrote {args.out / 'fisher_overlay.png'}, fisher_table.csv/.json and one .npz per model")
    return 0
