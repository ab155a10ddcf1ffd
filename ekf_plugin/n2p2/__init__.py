"""n2p2 / RuNNer interoperability, both ways.

* :mod:`ekf_plugin.n2p2.reader`: load n2p2 and RuNNer potential directories (``input.nn``,
  ``scaling.data``, ``weights.XXX.data``) into the plugin's BPNN (float64, Å/eV), and read
  ``input.data`` frames.
* :mod:`ekf_plugin.n2p2.writer`: export any plugin BPNN as such a directory (``ekf-plugin export``),
  and write ``input.data``.

Units at this boundary: the files are in their own length/energy units (the water potentials:
Bohr, Hartree); models are in Å and eV. Conversions use :mod:`ase.units`, once, here.
"""

from .reader import (
    assign_weights,
    load_n2p2_potential,
    n2p2_symmetry_functions,
    parse_input_nn,
    read_input_data,
    read_scaling,
    read_weights,
)

__all__ = [
    "assign_weights",
    "load_n2p2_potential",
    "n2p2_symmetry_functions",
    "parse_input_nn",
    "read_input_data",
    "read_scaling",
    "read_weights",
]
from .writer import export_n2p2, write_input_data  # noqa: E402

__all__ += ["export_n2p2", "write_input_data"]
