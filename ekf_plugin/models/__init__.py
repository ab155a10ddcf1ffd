"""Complete models: ``water_bpnn`` builder, ``save_model``/``load_model`` and model helpers."""

from .builders import bpnn_model, bpnn_potential, water_bpnn
from .io import (ModelLoadError, UntrustedModelError, build_from_config, enable_stress, load_model, model_config,
                 model_cutoff, model_elements, model_safe_globals, read_model_file, save_model)

__all__ = ["water_bpnn", "bpnn_model", "bpnn_potential", "save_model", "load_model", "model_cutoff", "model_elements",
           "model_config", "build_from_config", "enable_stress", "read_model_file", "model_safe_globals", "ModelLoadError",
           "UntrustedModelError"]
