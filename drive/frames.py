"""A picture as the model sees it: fitted to the model's input, and through the collectors' codec.

Collectors, the player, the capture agent and ``charles eval`` all fit pictures with :func:`fit_frame`,
so a model drives on pixels resized exactly as the ones it trained on.
"""

from __future__ import annotations

import cv2
import numpy as np

from charles.proto import Frame

Image = np.ndarray | Frame
"""A picture as a source hands it over: RGB uint8 pixels, or an already encoded frame (remote games)."""


def fit_frame(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """An RGB picture at exactly the model's resolution: the one resize collectors and players share.

    INTER_AREA averages the pixels a shrink drops (no aliasing of lane marks); growing uses bilinear.
    """
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    interp = cv2.INTER_AREA if w >= width and h >= height else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interp)


def as_trainer_sees(
    image: np.ndarray, width: int, height: int, codec: str = "jpeg", quality: int = 90
) -> np.ndarray:
    """The picture a model trains on: fitted, then through the collector's codec and back."""
    fitted = fit_frame(image, width, height)
    if codec == "raw":
        return fitted
    return Frame.encode(fitted, codec, quality).decode()
