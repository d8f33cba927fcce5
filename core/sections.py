"""Registers the typed configuration sections of the services with charles.config.

Each service package keeps its config dataclass next to its logic; this module is the one place that
folds them into the run configuration (so `charles config show` and the broker's config service see all).
The ``model`` section lives here because every service reads it: collectors need the model line's
inputs (resolution, stacked frames, history length), the trainer builds it, the player runs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from charles.config import ConfigError, knob, register_section


@dataclass
class ModelSection:
    """The model line this run trains: a preset and what the run changes of it."""

    preset: str = knob("tiny", "Model line preset (charles models lists them); tiny is the CPU demo line")
    overrides: dict = knob({}, "ModelConfig fields to change, e.g. {width: 320, height: 180, history: mlp}")
    # Where a *new* run's weights come from (the trainer reads these; a resumed run continues its checkpoint).
    pretrained_file: str = knob(
        "",
        "Local timm ImageNet .safetensors file for a new run's backbone(s); lines with pretrained: true "
        "(model_0005) need one. Nothing is ever downloaded",
    )
    transfer: dict = knob(
        {},
        "Parts a new run starts from our runs: part -> weights .safetensors or checkpoint folder, e.g. "
        "{backbones: runs/a/batch_000752000, history.lstm: runs/b/batch_000250000} (model_0009 needs both)",
    )

    def __post_init__(self) -> None:
        from charles.model.presets import list_presets

        if self.preset not in list_presets():
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; choose one of {list_presets()}")
        for part, path in self.transfer.items():
            if not (isinstance(part, str) and part and isinstance(path, str) and path):
                raise ConfigError(f"model.transfer: maps a part name to a file path, got {part!r}: {path!r}")

    def resolve(self) -> Any:
        """The full ModelConfig (charles.model.config) of this run."""
        from charles.model.presets import get_config

        try:
            return get_config(self.preset, **self.overrides)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.overrides: {e}") from None


register_section("model", ModelSection)

# section name -> "module:DataclassName" of the sections kept beside their service's logic.
_SECTIONS: dict[str, str] = {
    "balancer": "charles.balancer.config:BalancerConfig",
    "trainer": "charles.trainer.config:TrainerConfig",
    "collector": "charles.collector.config:CollectorConfig",
    "sim": "charles.sim.config:SimConfig",
    "npc": "charles.sim.config:NpcConfig",
    "unstuck": "charles.sim.config:UnstuckConfig",
    "player": "charles.player.config:PlayerConfig",
}

for _name, _target in _SECTIONS.items():
    _mod, _cls = _target.split(":")
    register_section(_name, getattr(importlib.import_module(_mod), _cls))
