"""Molecular dynamics with ekf-plugin models through i-PI.

* :mod:`ekf_plugin.md.protocol` — the i-PI socket wire protocol (numpy only);
* :mod:`ekf_plugin.md.pes` — the model in atomic units, also an i-PI python-driver PES class
  (``i-pi-py_driver -m custom -P <path of pes.py>``, or ``<ffdirect>``);
* :mod:`ekf_plugin.md.ipi_client` — the hardened client loop, :func:`run_client`
  (console: ``ekf-plugin ipi``);
* :mod:`ekf_plugin.md.runner` — i-PI input files, a supervised i-PI process, its output.
"""
