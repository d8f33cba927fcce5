"""Image frames on the wire: raw, JPEG or PNG, chosen by the sender and named in the header.

Frames are RGB, height x width x 3, uint8 (a single-channel frame is H x W x 1). A ``Frame`` keeps its
encoded bytes as they came off the socket (a memoryview into the ZeroMQ frame, not a copy) and decodes
only when someone asks for pixels, so the broker, the balancer and the trainer's buffers move compressed
bytes around and the decode happens once, at batch time.
"""

from __future__ import annotations

import os

import msgspec

from charles.proto import wire

MAX_SIDE = wire.LIMITS.max_side
"""No frame side may exceed this: a hostile header cannot make us allocate gigabytes."""
# OpenCV's own ceiling on what imdecode allocates (its default is 2**30 pixels), read once when cv2
# loads: charles/__init__.py sets it before any charles module imports cv2; this is for a process
# that reached us some other way. A frame that passes our checks is at most MAX_SIDE squared.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_SIDE * MAX_SIDE))

import cv2  # noqa: E402 - after the pixel limit above
import numpy as np  # noqa: E402

CODECS = wire.CODECS


class FrameError(ValueError):
    """A frame whose bytes do not match what its header says."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Frame(wire.FrameRef, gc=False):  # holds no containers: nothing for the collector to find
    """An encoded image: ``Frame(codec, shape, data)``, ``data`` the encoded bytes (a memoryview of the
    received ZeroMQ frame on the way in).

    It is the wire's ``FrameRef`` with methods: on the wire ``data`` is ``blob``, the index of the blob
    that holds the bytes, so a received sample decodes straight into Frames and the codec swaps each
    index for its bytes. In memory ``data`` always holds bytes (a Frame never goes on the wire as it is:
    ``charles.proto.encode`` writes the index).
    """

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
        """Pixels as an H x W x C uint8 array; raises FrameError if the bytes disagree with the header.

        A JPEG or PNG must say the header's height and width in its own header before OpenCV decodes it
        (``bad_shape`` otherwise), so a small file that claims a small shape cannot make us allocate the
        gigapixel image it really holds; bytes that still do not decode are ``undecodable_frame``.
        """
        h, w, c = self.shape
        if self.codec == "raw":
            if len(self.data) != h * w * c:
                raise FrameError(
                    "size_mismatch", f"raw frame {self.shape} needs {h * w * c} bytes, got {len(self.data)}"
                )
            return np.frombuffer(self.data, dtype=np.uint8).reshape(h, w, c)
        if self.codec not in CODECS:
            raise FrameError("bad_codec", f"unknown frame codec {self.codec!r}")
        self.check_encoded_size()
        flag = cv2.IMREAD_GRAYSCALE if c == 1 else cv2.IMREAD_COLOR
        try:
            img = cv2.imdecode(np.frombuffer(self.data, dtype=np.uint8), flag)
        except cv2.error:  # OpenCV 5 raises where 4 returned None (its pixel limit, some corrupt files)
            img = None
        if img is None:
            raise FrameError(
                "undecodable_frame", f"{self.codec} frame of {len(self.data)} bytes does not decode"
            )
        if c == 1:
            img = img[:, :, None]
        else:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img.shape != (h, w, c):
            raise FrameError(
                "size_mismatch", f"header says {self.shape}, {self.codec} data decodes to {img.shape}"
            )
        return img

    def check_encoded_size(self) -> None:
        """Raise FrameError unless a JPEG's or PNG's own header says this frame's height and width."""
        size = encoded_size(self.codec, self.data)
        if size is None:
            raise FrameError("undecodable_frame", f"no {self.codec} image header in {len(self.data)} bytes")
        if size != self.shape[:2]:
            raise FrameError(
                "bad_shape", f"header says {self.shape[:2]}, the {self.codec} image says {size} (not decoded)"
            )

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def header(self) -> dict:
        return {"codec": self.codec, "shape": list(self.shape), "dtype": "uint8"}

    @staticmethod
    def check_header(h: object) -> tuple[str, tuple[int, int, int]]:
        """Validate a frame's header dict against the contract's struct; returns (codec, shape) or raises
        FrameError with the contract's reason."""
        try:
            got = msgspec.convert(h, wire.FrameHeader)
        except msgspec.ValidationError as e:
            raise FrameError(
                wire.reason_of(str(e), wire.FrameHeader, lambda p: None, "bad_field"), str(e)
            ) from None
        return got.codec, got.shape


_PNG = b"\x89PNG\r\n\x1a\n"
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)


def encoded_size(codec: str, data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) as a PNG's IHDR or a JPEG's start-of-frame says, without decoding; None when the
    bytes hold no such header."""
    b = memoryview(data)
    if codec == "png":
        if len(b) < 24 or b[:8] != _PNG or b[12:16] != b"IHDR":
            return None
        return int.from_bytes(b[20:24], "big"), int.from_bytes(b[16:20], "big")
    if codec != "jpeg" or len(b) < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return None
    i, n = 2, len(b)
    while i + 4 <= n:  # every step moves i forward: bounded by the frame's length
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length = int.from_bytes(b[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker in _SOF:
            if i + 9 > n:
                return None
            return int.from_bytes(b[i + 5 : i + 7], "big"), int.from_bytes(b[i + 7 : i + 9], "big")
        i += 2 + length
    return None
