"""Image frames on the wire: raw, JPEG or PNG, chosen by the sender and named in the header.

Frames are RGB, height x width x 3, uint8 (a single-channel frame is H x W x 1). A ``Frame`` keeps its
encoded bytes as they came off the socket (a memoryview into the ZeroMQ frame, not a copy) and decodes
only when someone asks for pixels, so the broker, the balancer and the trainer's buffers move compressed
bytes around and the decode happens once, at batch time.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CODECS = ("raw", "jpeg", "png")
MAX_SIDE = 4096
"""No frame side may exceed this: a hostile header cannot make us allocate gigabytes."""


class FrameError(ValueError):
    """A frame whose bytes do not match what its header says."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(slots=True)
class Frame:
    codec: str
    shape: tuple[int, int, int]
    data: bytes | memoryview

    @classmethod
    def encode(cls, image: np.ndarray, codec: str = "jpeg", quality: int = 90) -> Frame:
        """Encode an RGB uint8 image (H x W x 3 or H x W x 1)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
            raise FrameError("bad_shape", f"frames are HxWx3 or HxWx1 uint8, got {image.shape} {image.dtype}")
        shape = (int(image.shape[0]), int(image.shape[1]), int(image.shape[2]))
        if codec == "raw":
            return cls("raw", shape, np.ascontiguousarray(image).tobytes())
        bgr = image if shape[2] == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        if codec == "jpeg":
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        elif codec == "png":
            ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        else:
            raise FrameError("bad_codec", f"unknown frame codec {codec!r}; use one of {CODECS}")
        if not ok:
            raise FrameError("encode_failed", f"OpenCV could not encode a {shape} frame as {codec}")
        return cls(codec, shape, buf.tobytes())

    def decode(self) -> np.ndarray:
        """Pixels as an H x W x C uint8 array; raises FrameError if the bytes disagree with the header."""
        h, w, c = self.shape
        if self.codec == "raw":
            if len(self.data) != h * w * c:
                raise FrameError(
                    "size_mismatch", f"raw frame {self.shape} needs {h * w * c} bytes, got {len(self.data)}"
                )
            return np.frombuffer(self.data, dtype=np.uint8).reshape(h, w, c)
        if self.codec not in CODECS:
            raise FrameError("bad_codec", f"unknown frame codec {self.codec!r}")
        flag = cv2.IMREAD_GRAYSCALE if c == 1 else cv2.IMREAD_COLOR
        img = cv2.imdecode(np.frombuffer(self.data, dtype=np.uint8), flag)
        if img is None:
            raise FrameError("size_mismatch", f"{self.codec} frame of {len(self.data)} bytes does not decode")
        if c == 1:
            img = img[:, :, None]
        else:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img.shape != (h, w, c):
            raise FrameError(
                "size_mismatch", f"header says {self.shape}, {self.codec} data decodes to {img.shape}"
            )
        return img

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def header(self) -> dict:
        return {"codec": self.codec, "shape": list(self.shape), "dtype": "uint8"}

    @staticmethod
    def check_header(h: object) -> tuple[str, tuple[int, int, int]]:
        """Validate a frame's header dict; returns (codec, shape) or raises FrameError."""
        if not isinstance(h, dict):
            raise FrameError("bad_field", "a frame header is a map with codec, shape and blob")
        codec, shape = h.get("codec"), h.get("shape")
        if h.get("dtype", "uint8") != "uint8":
            raise FrameError("bad_field", f"frame dtype must be uint8, got {h.get('dtype')!r}")
        if codec not in CODECS:
            raise FrameError("bad_codec", f"unknown frame codec {codec!r}; use one of {CODECS}")
        if (
            not isinstance(shape, list | tuple)
            or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
        ):
            raise FrameError("bad_shape", f"frame shape must be [height, width, channels], got {shape!r}")
        hgt, wid, ch = shape
        if not (0 < hgt <= MAX_SIDE and 0 < wid <= MAX_SIDE and ch in (1, 3)):
            raise FrameError(
                "bad_shape", f"frame shape {shape} out of range (sides 1..{MAX_SIDE}, 1 or 3 channels)"
            )
        return codec, (hgt, wid, ch)
