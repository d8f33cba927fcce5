"""Charles: one import namespace for every part (see README.md for the folder -> import name map)."""

import os

# OpenCV reads its decode pixel limit once, when cv2 loads, and some charles modules import cv2 before
# charles.proto does: the package itself sets it first. The value is the largest frame charles.proto
# accepts (registry.yaml limits.max_side squared); tests/test_proto_wire.py holds the two together.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(4096 * 4096))
