"""The typed sections of the run configuration, and the one place that registers them with charles.config.

What lives here: every service's section as a plain dataclass (``collector``, ``balancer``, ``trainer``
with its buffers and storage, ``player``, ``judge``) and the ``model`` section every service reads (collectors need
the model line's inputs, the trainer builds it, the player runs it); the sim's own sections (``sim``,
``npc``, ``unstuck``) stay in charles.sim.config beside the sim.

Why here and not beside each service: loading any configuration (`charles config show`, the broker's
config service, a checkpoint's saved config, every process at start) needs every section, and core
imports no service (tests/test_architecture.py). The sections are light (dataclasses and their checks);
the services import their own section from here.

Imports: charles.config, charles.outputs (the balancer's bins), charles.sim.config; charles.model lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from charles.config import ConfigError, knob, register_section
from charles.drive.unstuck import UnstuckConfig
from charles.sections.balancer import BalancerConfig
from charles.sections.collector import CollectorConfig
from charles.sections.judge import JudgeConfig
from charles.sections.player import PlayerConfig
from charles.sections.trainer import TrainerConfig
from charles.sim.config import NpcConfig, SimConfig


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


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "balancer": BalancerConfig,
    "trainer": TrainerConfig,
    "collector": CollectorConfig,
    "sim": SimConfig,
    "npc": NpcConfig,
    "unstuck": UnstuckConfig,
    "player": PlayerConfig,
    "judge": JudgeConfig,
}
"""Section name -> its dataclass, in the order `charles config show` lists them."""

for _name, _cls in _SECTIONS.items():
    register_section(_name, _cls)
