"""What the model line needs of each tick: one answer for collectors, the capture agent and the player."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InputShape:
    """The model input a sample must fit: resolution, stacked frames and history rows."""

    width: int
    height: int
    frames: int = 1
    """Stacked frames including the current one."""
    frame_stride: int = 1
    """Ticks between two stacked frames."""
    history_rows: int = 60
    """Rows of history a sample carries (at least what the model reads)."""

    @classmethod
    def of(cls, model_cfg: Any, history_rows: int = 60) -> InputShape:
        """From a charles.model.config.ModelConfig; history rows are at least what the model reads."""
        return cls(
            width=model_cfg.width,
            height=model_cfg.height,
            frames=model_cfg.frames,
            frame_stride=model_cfg.frame_stride,
            history_rows=max(history_rows, model_cfg.history_rows),
        )

    @property
    def span(self) -> int:
        """Past ticks the stack reaches back."""
        return (self.frames - 1) * self.frame_stride
