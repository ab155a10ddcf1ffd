"""Export a trained BPNN (our model file, an spktrain best_model, or an n2p2/RuNNer directory) as an
n2p2 potential directory: input.nn, scaling.data, weights.XXX.data and a README.md on units. n2p2's
nnp-predict and LAMMPS (pair_style hdnnp / nnp) run it; ekf_plugin.n2p2.load_n2p2_potential reads it back."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "export a BPNN model as an n2p2 potential directory (input.nn, scaling.data, weights.XXX.data)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model file (ekf-plugin save_model, spktrain best_model) or n2p2 directory")
    parser.add_argument("directory", help="output directory (created)")
    parser.add_argument("--format", choices=["n2p2"], default="n2p2", help="output format (n2p2 = RuNNer-compatible)")
    parser.add_argument("--length-unit", default=None, choices=["Angstrom", "Bohr"],
                        help="length unit of the files (default: Angstrom, or the unit of a loaded n2p2 directory)")
    parser.add_argument("--energy-unit", default=None, choices=["eV", "Hartree"],
                        help="energy unit of the files (default: eV, or the unit of a loaded n2p2 directory)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing input.nn in DIR")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models import load_model
    from ..n2p2.writer import export_n2p2

    model = load_model(args.model, dtype=torch.float64)
    out = export_n2p2(model, args.directory, length_unit=args.length_unit, energy_unit=args.energy_unit,
                      overwrite=args.force)
    print(f"wrote {out}/input.nn, scaling.data, weights.*.data, README.md")
    print((out / "README.md").read_text().split("\n\n")[1])
    return 0
