"""ekf-plugin's own components, registered through its own ``ekf_plugin`` entry point.

Targets are dotted paths: nothing heavy is imported when plugins are loaded.
"""

from .hookspecs import hookimpl


@hookimpl
def register_representations(register):
    register(
        "bpnn",
        "ekf_plugin.bpnn.BehlerParrinello",
        "Behler-Parrinello G2/G3 symmetry functions (config: model/representation=bpnn_water)",
    )


@hookimpl
def register_optimizers(register):
    register("ekf", "ekf_plugin.optim.EKF", "Extended Kalman Filter (config: task=ekf_paper)")
    register("adam_paper", "torch.optim.Adam", "Adam with the study's clipping and decay (config: task=adam_paper)")


@hookimpl
def register_callbacks(register):
    register(
        "fisher",
        "ekf_plugin.fisher.FisherSpectrumCallback",
        "Fisher-information spectrum of the L1 loss (config: +callbacks=fisher)",
    )


@hookimpl
def register_md_drivers(register):
    register("ipi", "ekf_plugin.md.ipi_client:run_client", "i-PI socket client (command: ekf-plugin ipi)")


@hookimpl
def register_config_dirs(register):
    register("ekf_plugin", "pkg://ekf_plugin.configs", "ekf-plugin's spktrain options")
