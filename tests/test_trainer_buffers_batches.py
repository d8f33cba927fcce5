"""Batch assembly from the buffers: decode, resize, collate shapes and masks, and the prefetch thread."""

from __future__ import annotations

import dataclasses
import math
import time

import cv2
import numpy as np
import pytest
import torch

from charles.proto.frames import Frame
from charles.trainer.batches import (
    BatchAssembler,
    BatchConfig,
    Prefetcher,
    decode_into,
    previous_of,
    targets_of,
)
from charles.trainer.buffers import BufferConfig, Buffers
from charles.trainer.synthetic import make_sample, make_set, road_image

OUTPUTS = ("steering", "throttle_brake")


def filled(n: int = 10, **sample_kw) -> Buffers:
    """Two v2 buffers of n samples each (start at 50 % so small tests can draw)."""
    b = Buffers(list(OUTPUTS), BufferConfig(capacity=n, start_fraction=0.5, seed=0))
    img = road_image(0)
    frame = Frame.encode(img, "jpeg", 90)
    for name in OUTPUTS:
        b.add_set(make_set([name], [make_sample(i, frame, **sample_kw) for i in range(n)]))
    return b


def test_collate_shapes_dtypes_and_masks():
    b = filled(history_len=10, stack_len=3)
    # one sample with a short history and a short stack, one with no previous action
    odd = b.buffers["steering"]._entries[0].sample
    odd.history, odd.stack, odd.previous = odd.history[-3:], odd.stack[:1], None
    cfg = BatchConfig(batch_size=20, outputs=OUTPUTS, image_size=(90, 160), history_len=8, stack_len=2)
    asm = BatchAssembler(b, cfg)
    batch = asm.next_batch(timeout=1)
    asm.close()
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in batch.items()}
    assert shapes == {
        "frame": ((20, 90, 160, 3), torch.uint8),
        "stack": ((20, 2, 90, 160, 3), torch.uint8),
        "speed": ((20,), torch.float32),
        "purpose": ((20, 2), torch.float32),
        "history": ((20, 8, 5), torch.float32),
        "previous": ((20, 2), torch.float32),
        "previous_valid": ((20,), torch.bool),
        "labels": ((20, 2), torch.float32),
        "label_mask": ((20, 2), torch.bool),
        "buffer": ((20,), torch.int64),
    }
    assert batch["frame"].is_contiguous() and batch["stack"].is_contiguous()
    assert b.sizes() == {"steering": 0, "throttle_brake": 0}  # removed on draw
    # v2 sets: each sample's label is valid for its own buffer's output only, and 0 (not NaN) elsewhere
    buf = batch["buffer"]
    assert buf.tolist() == [0] * 10 + [1] * 10
    assert batch["label_mask"].tolist() == [[True, False]] * 10 + [[False, True]] * 10
    assert torch.all(batch["labels"][~batch["label_mask"]] == 0)
    assert torch.isfinite(batch["labels"]).all()
    # labels and scalars are the samples' own
    seqs = [int(v - 10) for v in batch["speed"].tolist()]  # synthetic speed = 10 + seq % 20: seq known
    for i, seq in enumerate(seqs[:10]):
        assert batch["labels"][i, 0].item() == pytest.approx(math.sin(seq * 0.37), abs=1e-6)
    # the short history is right-aligned with zeros in front; the missing previous is flagged
    row = seqs.index(0)
    assert torch.all(batch["history"][row, :5] == 0)
    assert torch.equal(batch["history"][row, 5:], torch.from_numpy(odd.history))
    assert not batch["previous_valid"][row] and torch.all(batch["previous"][row] == 0)
    assert int(batch["previous_valid"].sum()) == 19
    # the pixels are the frame, resized
    want = cv2.resize(road_image(0), (160, 90), interpolation=cv2.INTER_AREA)
    assert np.abs(batch["frame"][0].numpy().astype(int) - want.astype(int)).mean() < 6
    assert torch.equal(batch["stack"][row, 0], batch["stack"][row, 1])  # a short stack repeats its oldest


def test_targets_and_previous_for_the_model_losses():
    b = filled()
    asm = BatchAssembler(b, BatchConfig(batch_size=4, outputs=OUTPUTS))
    batch = asm.next_batch(timeout=1)
    asm.close()
    t = targets_of(batch, OUTPUTS)
    assert torch.isnan(t["throttle_brake"][:2]).all() and torch.isfinite(t["steering"][:2]).all()
    p = previous_of(batch, ("steering", "brake"))
    assert p["brake"].min() >= 0 and p["steering"].shape == (4,)


def test_raw_frames_decode_exactly_and_native_size_is_kept():
    img = road_image(3, 27, 48)
    b = Buffers(["steering"], BufferConfig(capacity=4, start_fraction=0.5))
    b.add("steering", [make_sample(i, Frame.encode(img, "raw")) for i in range(4)], frozenset({"steering"}))
    asm = BatchAssembler(b, BatchConfig(batch_size=2, outputs=("steering",)))
    batch = asm.next_batch(timeout=1)
    asm.close()
    assert torch.equal(batch["frame"][1], torch.from_numpy(img))


def test_png_and_grey_frames_decode():
    grey = road_image(1, 30, 40)[:, :, :1].copy()
    out = np.empty((15, 20, 1), np.uint8)
    decode_into(Frame.encode(grey, "png"), out)
    assert (
        np.abs(out.astype(int) - cv2.resize(grey, (20, 15), interpolation=cv2.INTER_AREA)[:, :, None]).max()
        <= 1
    )


def test_fast_downscale_stays_close_to_a_full_decode_and_resize():
    img = road_image(5)
    frame = Frame.encode(img, "jpeg", 95)
    fast, slow = np.empty((90, 160, 3), np.uint8), np.empty((90, 160, 3), np.uint8)
    decode_into(frame, fast, fast_downscale=True)
    decode_into(frame, slow, fast_downscale=False)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 3


def test_corrupt_frame_masks_its_sample_and_is_counted():
    b = filled(4)
    broken = b.buffers["steering"]._entries[2].sample
    broken.frame = Frame("jpeg", broken.frame.shape, b"\xff\xd8 not a jpeg")
    wrong = b.buffers["steering"]._entries[3].sample
    wrong.frame = Frame("jpeg", (100, 100, 3), wrong.frame.data)  # header disagrees with the data
    asm = BatchAssembler(b, BatchConfig(batch_size=8, outputs=OUTPUTS))
    batch = asm.next_batch(timeout=1)
    asm.close()
    seqs = [int(v - 10) for v in batch["speed"].tolist()]
    for seq in (2, 3):
        row = seqs.index(seq)  # steering buffer rows come first; seq is unique within them
        assert not batch["label_mask"][row].any()
        assert torch.all(batch["frame"][row] == 0)
    assert asm.stats()["bad_frames"] == 2
    assert int(batch["label_mask"].sum()) == 6


def test_a_sample_whose_frame_does_not_decode_leaves_the_buffer_and_the_storage_even_when_reusable():
    """With reuse (samples_per_insert > 1) a drawn sample stays for later batches; one whose frame does
    not decode would fail every time, so it leaves the buffer and, through the observer, the storage."""
    b = Buffers(list(OUTPUTS), BufferConfig(capacity=4, start_fraction=0.5, seed=0, samples_per_insert=4.0))
    frame = Frame.encode(road_image(0), "jpeg", 90)
    for name in OUTPUTS:
        b.add_set(make_set([name], [make_sample(i, frame) for i in range(4)]))
    removed: list[tuple[str, list[int]]] = []

    class Observer:
        def on_insert(self, buffer, entries):
            pass

        def on_remove(self, buffer, keys):
            removed.append((buffer, list(keys)))

    b.observer = Observer()
    broken = next(iter(b.buffers["steering"]._entries.values()))
    broken.sample.frame = Frame("jpeg", frame.shape, b"\xff\xd8\xff\xe0 a JPEG header over garbage")
    asm = BatchAssembler(b, BatchConfig(batch_size=8, outputs=OUTPUTS))
    asm.next_batch(timeout=1)  # every sample is drawn: the broken one among them
    asm.close()
    assert asm.stats()["bad_frames"] == 1
    assert broken.key not in b.buffers["steering"]._entries and len(b.buffers["steering"]) == 3
    assert b.stats()["buffers"]["steering"]["discarded"] == 1 and ("steering", [broken.key]) in removed


def test_batch_must_split_equally_over_buffers():
    with pytest.raises(ValueError, match="split equally"):
        BatchAssembler(filled(), BatchConfig(batch_size=7))


def test_prefetcher_delivers_measures_wait_and_stops_cleanly():
    b = Buffers(list(OUTPUTS), BufferConfig(capacity=40, start_fraction=0.5, seed=0))
    frame = Frame.encode(road_image(0, 27, 48), "jpeg")
    asm = BatchAssembler(b, BatchConfig(batch_size=4, outputs=OUTPUTS, prefetch=2, decode_threads=2))
    with Prefetcher(asm, poll=0.02) as pf:
        assert pf.get(timeout=0.05) is None  # buffers not ready yet: nothing, no error
        for name in OUTPUTS:
            b.add_set(make_set([name], [make_sample(i, frame) for i in range(40)]))
        got = [pf.get(timeout=2) for _ in range(5)]
        assert all(g is not None and g["frame"].shape == (4, 27, 48, 3) for g in got)
        assert pf.delivered == 5 and pf.wait_s > 0 and 0 < pf.wait_fraction <= 1
        time.sleep(0.05)
        # at most prefetch batches sit ready (plus one being built): the queue is bounded
        assert 40 - min(b.sizes().values()) <= 2 * (5 + 2 + 1)
    assert not pf._thread.is_alive()
    assert pf.get(timeout=0.1) is None  # after close: the end, at once
    asm.close()


def test_prefetcher_surfaces_errors():
    class Broken:
        config = BatchConfig(prefetch=1)

        def next_batch(self, timeout):
            raise OSError("disk on fire")

    pf = Prefetcher(Broken(), poll=0.01)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="prefetch") as e:
        pf.get(timeout=2)
    assert isinstance(e.value.__cause__, OSError)
    pf.close()


def test_config_fields_have_help():
    assert all(f.metadata.get("help") for f in dataclasses.fields(BatchConfig))


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_matches_cpu_decode():
    b = filled(8)
    cfg = BatchConfig(batch_size=16, outputs=OUTPUTS, image_size=(135, 240))
    gpu = BatchAssembler(b, cfg, device="cuda").next_batch(timeout=1)
    assert gpu["frame"].is_cuda and gpu["frame"].shape == (16, 135, 240, 3)
    cpu = np.empty((135, 240, 3), np.uint8)
    decode_into(Frame.encode(road_image(0), "jpeg", 90), cpu)
    assert np.abs(gpu["frame"][0].cpu().numpy().astype(int) - cpu.astype(int)).mean() < 4


@pytest.mark.filterwarnings("ignore:The given buffer is not writable", "ignore::DeprecationWarning")
def test_nvjpeg_path_logic_with_the_cpu_decoder():
    """The GPU path's batching, resize, fallback and masking, run on torchvision's CPU JPEG decoder."""
    img = road_image(2)
    frames = [
        Frame.encode(img, "jpeg", 90),
        Frame("jpeg", (270, 480, 3), b"\xff\xd8\xff garbage"),  # fails the batched call -> CPU path
        Frame.encode(img[:27, :48].copy(), "raw"),
        Frame.encode(img, "jpeg", 90),
    ]
    asm = BatchAssembler(filled(2), BatchConfig(batch_size=2, outputs=OUTPUTS))
    out, failed = asm._decode_gpu(frames, (90, 160))
    assert failed == [1] and out.shape == (4, 90, 160, 3)
    ok = [f for i, f in enumerate(frames) if i != 1]
    out2, failed2 = asm._decode_gpu(ok, (90, 160))  # the batched call itself, with a resize
    want = cv2.resize(img, (160, 90), interpolation=cv2.INTER_AREA).astype(int)
    assert failed2 == [] and np.abs(out2[0].numpy().astype(int) - want).mean() < 4
    assert torch.equal(out2[0], out2[2])
    asm.close()
