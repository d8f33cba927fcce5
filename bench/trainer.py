"""Trainer data-path benchmarks: can batch assembly keep the model fed, and is the storage fast enough?

    python bench/trainer.py [--quick] [--part a,b,c,d]

(a) CPU: batch assembly (draw, remove, decode, collate) in images/s for 480x270 JPEG frames (~25 KB) fed
    to a 480x270 model and to a 160x90 model (the CPU presets' size; libjpeg's DCT downscale plus
    cv2.resize), against the images/s a training step consumes: the real ``charles.model`` preset
    (``tiny`` by default: regnetx_002) at that size, trained by ``charles.trainer.training.Trainer`` on a
    real assembled batch (prepare_batch, forward, per-output losses, backward, clipping, AdamW). The goal
    is assembly >= 2x the step: on a CPU-only box the two share the cores, so assembly must cost well
    under half the CPU time per image. The top-level keys report the worse of the two sizes.
(b) GPU, only with CUDA: the model_0004 preset (inception_resnet_v2 at 480x270) trained by our
    ``Trainer`` as the service runs it (nvJPEG decode on the prefetch thread, channels_last, bf16 autocast,
    fused AdamW, clipping, per-output losses) against a plain fp32 PyTorch loop on the same timm backbone
    (its classifier as the outputs, MSE, NCHW, CPU decode in the training thread, no prefetch), in one run,
    with each loop's data-wait fraction and peak GPU memory. Hidden ``--b-loops compiled`` adds our step
    under torch.compile (trainer.compile): its steady images/s, compile time and after how many batches
    it pays. Hidden ``--b-device cpu --b-preset tiny`` runs the same code on a CPU (a smoke test of the
    code path, not a measurement; ``--b-compile-backend aot_eager`` there, inductor takes minutes).
(c) Storage: write and refill samples/s of the SQLite store against a minimal segment-file baseline
    (length-prefixed records appended to one file), same records, same process.
(d) JPEG decode of 480x270 frames: the trainer's CPU path (cv2 on its decode threads) against nvJPEG
    (torchvision's batched decode_jpeg on the GPU, and the trainer's CUDA path around it); without CUDA
    nvJPEG is reported unavailable.

bench/gpu.py runs (b) and (d) on a GPU with the player's figures, as one command (``make bench-gpu``).

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

from charles.proto.frames import Frame
from charles.trainer.batches import BatchAssembler, BatchConfig, Prefetcher
from charles.trainer.buffers import BufferConfig, Buffers, Entry
from charles.trainer.storage import Storage, StorageConfig, decode_record, encode_record
from charles.trainer.synthetic import make_frames, make_sample, make_set

OUTPUTS = ("steering", "throttle_brake")


def filled_buffers(frames: list[Frame], per_buffer: int, history_len: int = 0) -> Buffers:
    """Two v2 buffers holding per_buffer samples each, ready to draw from the first sample on."""
    b = Buffers(list(OUTPUTS), BufferConfig(capacity=per_buffer, start_fraction=0.01, seed=0))
    for name in OUTPUTS:
        samples = [
            make_sample(i, frames[i % len(frames)], history_len=history_len) for i in range(per_buffer)
        ]
        b.add_set(make_set([name], samples))
    return b


# ---- (a) assembly vs a CPU training step ----------------------------------------------------------------


def assembly_rate(
    frames: list[Frame], size: tuple[int, int], batch: int, batches: int, threads: int, repeats: int
) -> float:
    """Images/s through draw -> remove -> decode -> collate (no prefetch thread: its own cost is measured).

    Best of ``repeats`` timed blocks: the box is shared, and the least disturbed block is the code's speed.
    """
    buffers = filled_buffers(frames, batch // 2 * (batches * repeats + 1), history_len=60)
    asm = BatchAssembler(
        buffers, BatchConfig(batch_size=batch, image_size=size, history_len=60, decode_threads=threads)
    )
    asm.next_batch(timeout=1)  # warm the pool and the allocator
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(batches):
            asm.next_batch(timeout=1)
        best = max(best, batches * batch / (time.perf_counter() - t0))
    asm.close()
    return best


def normalise(frame: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW with channels_last strides, as the model's input stage does (part b)."""
    return frame.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def batch_config(cfg, batch: int, **kw) -> BatchConfig:
    """Batches shaped for a model line, as the trainer service assembles them (``cfg``: a ModelConfig)."""
    return BatchConfig(
        batch_size=batch,
        outputs=cfg.output_names,
        image_size=(cfg.height, cfg.width),
        stack_len=cfg.frames - 1,
        history_len=cfg.history_rows,
        **kw,
    )


def step_rate(preset: str, size: tuple[int, int], batch: int, steps: int, repeats: int) -> float:
    """Images/s of the trainer's step on CPU for a ``charles.model`` preset at ``size`` (best block)."""
    from charles.model.presets import get_config
    from charles.sections.trainer import TrainerConfig
    from charles.trainer.training import Trainer

    cfg = get_config(preset, height=size[0], width=size[1])
    trainer = Trainer(cfg, TrainerConfig(lr=1e-4), "cpu")
    frames = make_frames(8, height=size[0], width=size[1])
    asm = BatchAssembler(
        filled_buffers(frames, batch, history_len=cfg.history_length),
        batch_config(cfg, batch, decode_threads=1),
    )
    b = asm.next_batch(timeout=1)
    asm.close()

    trainer.step(b)  # first step allocates
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.step(b)
        best = max(best, steps * batch / (time.perf_counter() - t0))
    return best


def part_a(args: argparse.Namespace) -> dict:
    frames = make_frames(48 if args.quick else 200)
    threads = args.threads or min(4, os.cpu_count() or 1)
    by_size = {}
    repeats = 2 if args.quick else 3  # timed blocks per measurement; the best one counts
    for size in ((270, 480), (90, 160)):
        name = f"{size[1]}x{size[0]}"
        asm = assembly_rate(
            frames, size, 32, batches=6 if args.quick else 20, threads=threads, repeats=repeats
        )
        # --quick: one timed step of 8, to stay under 30 s on two shared cores (the 480x270 step is slow)
        stp = step_rate(
            args.step_model,
            size,
            8 if args.quick else 16,
            steps=1 if args.quick else 2,
            repeats=1 if args.quick else 3,
        )
        by_size[name] = {
            "assembly_images_per_s": round(asm, 1),
            "step_images_per_s": round(stp, 1),
            "assembly_to_step_ratio": round(asm / stp, 2),
        }
        print(
            f"(a) {name}: assembly {asm:.0f} img/s, {args.step_model} step {stp:.1f} img/s, ratio {asm / stp:.1f}"
        )
    worst = min(by_size.values(), key=lambda v: v["assembly_to_step_ratio"])
    mean_kb = sum(f.nbytes for f in frames) / len(frames) / 1024
    return {
        **worst,
        "worst_size": next(k for k, v in by_size.items() if v is worst),
        "by_size": by_size,
        "jpeg_kb": round(mean_kb, 1),
        "decode_threads": threads,
        "torch_threads": torch.get_num_threads(),
        "step_model": args.step_model,
    }


# ---- (b) GPU: our Trainer vs a plain fp32 loop ---------------------------------------------------------
# Runs only where CUDA is; on CPU it prints a note and reports {"skipped": ...} (unless --b-device cpu).

B_LOOPS = ("ours", "plain_fp32", "compiled")


class Timer:
    """Wall time and peak GPU memory of a loop's timed steps (GPU work waited for at both ends)."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"
        self.dev = dev

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def reset_memory(self) -> None:
        """Start the peak count afresh (what the loop before left is freed once its function returned)."""
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_memory_mib(self) -> float | None:
        """Peak GPU memory the loop's tensors took (None on the CPU: there is no GPU memory to measure)."""
        return round(torch.cuda.max_memory_allocated(self.dev) / 2**20, 1) if self.cuda else None


def ours_loop(
    cfg, dev: torch.device, frames: list[Frame], batch: int, steps: int, compile_backend: str | None = None
) -> dict:
    """The trainer's own step (bf16 autocast and channels_last on CUDA, fused AdamW, clipping, the per-output
    losses) fed as the service feeds it: decode (nvJPEG on CUDA) on the prefetch thread. With
    ``compile_backend`` the same under torch.compile (trainer.compile); its first steps compile."""
    from charles.sections.trainer import TrainerConfig
    from charles.trainer.training import Trainer

    timer = Timer(dev)
    timer.reset_memory()
    tcfg = TrainerConfig(lr=1e-4, compile=compile_backend is not None)
    trainer = Trainer(cfg, tcfg, dev, compile_backend=compile_backend or "inductor")
    asm = BatchAssembler(
        filled_buffers(frames, batch // 2 * (steps + 4), history_len=cfg.history_length),
        batch_config(cfg, batch, gpu_decode=tcfg.gpu_decode, prefetch=tcfg.prefetch),
        device=dev,
    )
    with Prefetcher(asm) as pf:
        t0 = time.perf_counter()
        for _ in range(3):
            trainer.step(pf.get(timeout=30))
        timer.sync()
        warm = time.perf_counter() - t0
        wait0, t0 = pf.wait_s, time.perf_counter()
        for _ in range(steps):
            trainer.step(pf.get(timeout=30))
        timer.sync()
        dt = time.perf_counter() - t0
        out = {
            "images_per_s": round(steps * batch / dt, 1),
            "data_wait_fraction": round((pf.wait_s - wait0) / dt, 3),
            "peak_gpu_memory_mib": timer.peak_memory_mib(),
        }
    asm.close()
    if compile_backend is not None:
        # the first three steps less three steady ones: what compiling cost (inductor: once per process)
        out["compile_s"] = round(max(0.0, warm - 3 * dt / steps), 1)
        out["backend"] = compile_backend
    return out


def plain_loop(cfg, dev: torch.device, frames: list[Frame], batch: int, steps: int) -> dict:
    """The same timm backbone with its classifier as the outputs, fp32, NCHW, MSE, CPU decode in the
    training thread, no prefetch: what a first PyTorch loop would be."""
    import timm

    timer = Timer(dev)
    timer.reset_memory()
    model = timm.create_model(cfg.backbone, pretrained=False, num_classes=len(cfg.outputs)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=timer.cuda or None)

    def plain_step(b: dict) -> None:
        x = normalise(b["frame"].to(dev, non_blocking=True))
        y = b["labels"].to(dev, non_blocking=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    asm = BatchAssembler(
        filled_buffers(frames, batch // 2 * (steps + 4)),
        batch_config(cfg.replace(history="none"), batch, pin_memory=False),
        device="cpu",
    )
    for _ in range(3):
        plain_step(asm.next_batch(timeout=1))
    timer.sync()
    wait, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        t1 = time.perf_counter()
        b = asm.next_batch(timeout=1)
        wait += time.perf_counter() - t1
        plain_step(b)
    timer.sync()
    dt = time.perf_counter() - t0
    asm.close()
    out = {
        "images_per_s": round(steps * batch / dt, 1),
        "data_wait_fraction": round(wait / dt, 3),
        "peak_gpu_memory_mib": timer.peak_memory_mib(),
    }
    return out


def part_b(args: argparse.Namespace) -> dict:
    dev = torch.device(args.b_device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("(b) skipped: no CUDA here (the GPU comparison needs a GPU)")
        return {"skipped": "no CUDA"}
    from charles.model.presets import get_config

    loops = args.b_loops.split(",")
    unknown = set(loops) - set(B_LOOPS)
    if unknown:
        raise SystemExit(f"--b-loops: unknown {sorted(unknown)}; choose from {B_LOOPS}")
    torch.backends.cudnn.benchmark = True
    cfg = get_config(args.b_preset)
    batch, steps = args.b_batch, args.b_steps or (8 if args.quick else 30)
    frames = make_frames(64 if args.quick else 200)
    results: dict = {}
    if "ours" in loops:
        results["ours"] = ours_loop(cfg, dev, frames, batch, steps)
    if "plain_fp32" in loops:
        results["plain_fp32"] = plain_loop(cfg, dev, frames, batch, steps)
    if "compiled" in loops:
        results["compiled"] = ours_loop(
            cfg, dev, frames, batch, steps, compile_backend=args.b_compile_backend
        )
    if "ours" in results and "plain_fp32" in results:
        results["speedup"] = round(results["ours"]["images_per_s"] / results["plain_fp32"]["images_per_s"], 2)
    if "ours" in results and "compiled" in results:
        results["compiled"].update(compile_pays(results["ours"], results["compiled"], batch))
    results["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    results["preset"] = cfg.name
    results["input"] = [cfg.width, cfg.height]
    results["batch"] = batch
    print(f"(b) {cfg.name} ({cfg.backbone}) {cfg.width}x{cfg.height} b{batch}: {results}")
    return results


def compile_pays(ours: dict, compiled: dict, batch: int) -> dict:
    """Whether torch.compile pays for the trainer: its steady speed against the eager step, and after how
    many batches its compile time is won back (None: it never is, the compiled step is not faster)."""
    eager_s, compiled_s = batch / ours["images_per_s"], batch / compiled["images_per_s"]
    saved = eager_s - compiled_s
    return {
        "speedup_vs_ours": round(compiled["images_per_s"] / ours["images_per_s"], 2),
        "pays_after_batches": math.ceil(compiled["compile_s"] / saved) if saved > 0 else None,
    }


# ---- (d) JPEG decode: nvJPEG against the CPU ------------------------------------------------------------


def part_d(args: argparse.Namespace) -> dict:
    """Images/s of the trainer's JPEG decode at 480x270: the CPU path (cv2.imdecode on the decode threads
    into one tensor, as BatchAssembler does without CUDA) against nvJPEG (torchvision's batched
    decode_jpeg on the GPU, as BatchAssembler does with CUDA), batches of 64, best of a few blocks.
    Without CUDA nvJPEG is reported unavailable, not measured."""
    from torchvision.io import ImageReadMode, decode_jpeg

    batch, blocks = 64, (2 if args.quick else 5)
    per_block = 2 if args.quick else 8  # batches per timed block
    frames = make_frames(batch * 2 if args.quick else batch * 4)
    size = frames[0].shape[:2]
    threads = args.threads or min(4, os.cpu_count() or 1)
    chunks = [frames[i : i + batch] for i in range(0, len(frames), batch)]
    buffers = Buffers(list(OUTPUTS), BufferConfig(capacity=batch))

    def best_rate(decode) -> float:
        decode(chunks[0])  # warm: threads, allocator, nvJPEG handles
        best = 0.0
        for _ in range(blocks):
            t0 = time.perf_counter()
            for k in range(per_block):
                decode(chunks[k % len(chunks)])
            best = max(best, per_block * batch / (time.perf_counter() - t0))
        return best

    cpu_asm = BatchAssembler(
        buffers, BatchConfig(batch_size=batch, image_size=size, decode_threads=threads, pin_memory=False)
    )

    def cpu_decode(chunk: list[Frame]) -> None:
        _, failed = cpu_asm._decode_cpu(chunk, size)  # the trainer's CPU path
        assert not failed, f"{len(failed)} frames did not decode"

    out: dict = {
        "frame": [size[1], size[0]],
        "jpeg_kb": round(sum(f.nbytes for f in frames) / len(frames) / 1024, 1),
        "batch": batch,
        "cpu": {"images_per_s": round(best_rate(cpu_decode), 1), "threads": threads},
    }
    cpu_asm.close()
    dev = torch.device(args.b_device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        out["nvjpeg"] = {"unavailable": "no CUDA here: nvJPEG decodes on an NVIDIA GPU"}
        print(f"(d) decode {size[1]}x{size[0]}: CPU {out['cpu']}; nvJPEG unavailable (no CUDA)")
        return out

    def nvjpeg(chunk: list[Frame]) -> None:
        data = [torch.frombuffer(f.data, dtype=torch.uint8) for f in chunk]
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)  # raises if nvJPEG cannot
        assert len(images) == len(chunk) and images[0].is_cuda
        torch.cuda.synchronize(dev)

    gpu_asm = BatchAssembler(buffers, BatchConfig(batch_size=batch, image_size=size), device=dev)

    def trainer_gpu(chunk: list[Frame]) -> None:
        # the trainer's CUDA path: nvJPEG plus its checks and the copy into the batch tensor (it would
        # fall back to the CPU for frames nvJPEG refuses, so the raw figure above is measured apart)
        _, failed = gpu_asm._decode_gpu(chunk, size)
        assert not failed, f"{len(failed)} frames did not decode"
        torch.cuda.synchronize(dev)

    rate = best_rate(nvjpeg)
    out["nvjpeg"] = {
        "images_per_s": round(rate, 1),
        "trainer_path_images_per_s": round(best_rate(trainer_gpu), 1),
        "speedup_vs_cpu": round(rate / out["cpu"]["images_per_s"], 2),
        "device": torch.cuda.get_device_name(dev),
    }
    gpu_asm.close()
    print(f"(d) decode {size[1]}x{size[0]}: CPU {out['cpu']}, nvJPEG {out['nvjpeg']}")
    return out


# ---- (c) storage: SQLite vs a segment-file baseline -----------------------------------------------------

_LEN = struct.Struct("<I")


def segment_baseline(path: Path, entries: list[Entry]) -> tuple[float, float]:
    """Append length-prefixed records to one file (flushed every 256), then read and decode them all.

    No CRC framing, no manifest, no deletes: the cheapest thing a segment format could be, so it bounds
    from above what writing our own would buy over SQLite.
    """
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for i, e in enumerate(entries):
            rec = encode_record("steering", e)
            f.write(_LEN.pack(len(rec)))
            f.write(rec)
            if i % 256 == 255:
                f.flush()
    write = len(entries) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    data = path.read_bytes()
    view, at, n = memoryview(data), 0, 0
    while at < len(view):
        (size,) = _LEN.unpack_from(view, at)
        decode_record(view[at + 4 : at + 4 + size])
        at += 4 + size
        n += 1
    refill = n / (time.perf_counter() - t0)
    return write, refill


def part_c(args: argparse.Namespace) -> dict:
    n = 1000 if args.quick else 5000
    frames = make_frames(48 if args.quick else 100)
    samples = [make_sample(i, frames[i % len(frames)], history_len=60) for i in range(n)]
    out: dict = {"samples": n, "jpeg_kb": round(sum(f.nbytes for f in frames) / len(frames) / 1024, 1)}
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        # NORMAL is the default (survives kill -9; a power loss may drop the last commits); FULL fsyncs each
        for sync in ("NORMAL", "FULL"):
            path = Path(d) / f"buffers-{sync}.sqlite3"
            storage = Storage(StorageConfig(path=str(path), queue_samples=n, synchronous=sync), capacity=n)
            buffers = Buffers(["steering"], BufferConfig(capacity=n), observer=storage)
            t0 = time.perf_counter()
            for i in range(0, n, 64):  # sets as the balancer sends them
                buffers.add_set(make_set(["steering"], samples[i : i + 64]))
            storage.flush(120)
            write = n / (time.perf_counter() - t0)
            storage.close()
            storage = Storage(StorageConfig(path=str(path), mirror_removals=False), capacity=n)
            refill_s = math.inf
            for _ in range(3):  # best of 3: the box is shared
                fresh = Buffers(["steering"], BufferConfig(capacity=n))
                report = storage.refill(fresh)
                assert report.total == n and not report.corrupt, report
                refill_s = min(refill_s, report.seconds)
            storage.close()
            key = "sqlite" if sync == "NORMAL" else "sqlite_full_sync"
            out[key] = {
                "write_samples_per_s": round(write),
                "refill_samples_per_s": round(n / report.seconds),
            }
            out.setdefault("sqlite_bytes_per_sample", round(path.stat().st_size / n))
        entries = [Entry(i, s, frozenset({"steering"})) for i, s in enumerate(samples)]
        runs = [segment_baseline(Path(d) / "segment.bin", entries) for _ in range(3)]
        w, r = max(x[0] for x in runs), max(x[1] for x in runs)
        out["segment_file"] = {"write_samples_per_s": round(w), "refill_samples_per_s": round(r)}
    print(
        f"(c) storage, {n} samples of {out['jpeg_kb']} KB: sqlite {out['sqlite']}, "
        f"sqlite FULL sync {out['sqlite_full_sync']}, segment file {out['segment_file']}"
    )
    print("    (page cache warm: refill measures decode + SQLite, not the disk)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, under 30 s")
    p.add_argument(
        "--part",
        default="a,b,c,d",
        help="comma-separated parts to run: a (CPU), b (GPU), c (storage), d (JPEG decode, nvJPEG vs CPU)",
    )
    p.add_argument(
        "--step-model", default="tiny", help="charles.model preset for the CPU training step of part (a)"
    )
    p.add_argument("--threads", type=int, default=0, help="decode threads (0: min(4, cores))")
    # part (b) on another line or device: a CPU smoke test of its code path (--b-device cpu --b-preset tiny)
    p.add_argument("--b-preset", default="model_0004_inceptionresnetv2", help=argparse.SUPPRESS)
    p.add_argument("--b-device", default="cuda", help=argparse.SUPPRESS)
    # which loops part (b) runs (bench/gpu.py runs the compiled one in a process of its own, with a time
    # limit), and the compiled loop's backend (aot_eager for a CPU smoke test: inductor takes minutes there)
    p.add_argument("--b-loops", default="ours,plain_fp32", help=argparse.SUPPRESS)
    p.add_argument("--b-compile-backend", default="inductor", help=argparse.SUPPRESS)
    p.add_argument("--b-batch", type=int, default=32, help=argparse.SUPPRESS)  # even: two buffers
    p.add_argument("--b-steps", type=int, default=0, help=argparse.SUPPRESS)  # 0: 8 with --quick, else 30
    p.add_argument("--tmp", default=None, help="folder for the storage files of part (c)")
    args = p.parse_args(argv)
    parts = set(args.part.split(","))
    t0 = time.perf_counter()
    result: dict = {"bench": "trainer", "quick": args.quick, "cpus": os.cpu_count()}
    if "a" in parts:
        result.update(part_a(args))
    if "b" in parts:
        result["gpu"] = part_b(args)
    if "c" in parts:
        result["storage"] = part_c(args)
    if "d" in parts:
        result["decode"] = part_d(args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
