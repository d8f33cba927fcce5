"""charles.model — the seed's model lines on timm, for the trainer and the player.

Modules (flat):

- ``config``    ModelConfig (plain data, no torch import)
- ``presets``   the seed's model lines and CPU presets as registered ModelConfig functions
- ``net``       CharlesNet and its blocks, ``build_model``, ``optimize_for_device``
- ``inputs``    ``prepare_batch``: raw samples -> network inputs on the device
- ``losses``    ``compute_loss``, ``compute_metrics``, ``encode_targets``, ``decode`` per output kind
- ``weights``   safetensors ``save_weights`` / ``load_weights`` with identity, ``load_parts`` for transfer
- ``convcam``   ``ActivationTap``, ``feature_maps``, ``convcam_image``
- ``predictor`` ``Predictor`` for the player

Names are imported lazily, so ``from charles.model import ModelConfig`` does not pull in torch.

Imports: core (charles.outputs); never a service, charles.sim or charles.agents.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "config",
    "field_help": "config",
    "HISTORY_FIELDS": "config",
    "get_config": "presets",
    "list_presets": "presets",
    "register_preset": "presets",
    "describe_preset": "presets",
    "CharlesNet": "net",
    "build_model": "net",
    "count_parameters": "net",
    "optimize_for_device": "net",
    "torch_threads": "net",
    "prepare_batch": "inputs",
    "example_batch": "inputs",
    "image_stats": "inputs",
    "compute_loss": "losses",
    "compute_metrics": "losses",
    "encode_targets": "losses",
    "decode": "losses",
    "bin_indices": "losses",
    "save_weights": "weights",
    "load_weights": "weights",
    "read_weights": "weights",
    "load_parts": "weights",
    "model_from_weights": "weights",
    "WeightsError": "weights",
    "LoadedWeights": "weights",
    "LoadReport": "weights",
    "ActivationTap": "convcam",
    "feature_maps": "convcam",
    "convcam_image": "convcam",
    "convcam_layers": "convcam",
    "Predictor": "predictor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"charles.model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'charles.model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
