"""``charles model`` (``python -m charles.model``): list the presets, show a config, or measure them here.

charles model                      # presets and what they are
charles model show tiny            # a preset's config as JSON (what checkpoints carry)
charles model fields               # every ModelConfig field with its help
charles model bench tiny model_0004_inceptionresnetv2 [--device cuda] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import time

from charles.cli import help_text


def _bench(names: list[str], device: str, batch: int, repeats: int) -> None:
    import torch

    from charles.model.inputs import example_batch, prepare_batch
    from charles.model.net import build_model, count_parameters, optimize_for_device
    from charles.model.presets import get_config

    for name in names:
        cfg = get_config(name, pretrained=False)
        model = optimize_for_device(build_model(cfg).eval(), device)
        raw = example_batch(cfg, batch)
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first pass pays for lazy initialisation
                t0 = time.perf_counter()
                model(**prepare_batch(raw, cfg, device))
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        best = min(times[1:])
        print(
            f"{name:30s} {cfg.width}x{cfg.height}x{cfg.frames}  {count_parameters(model):>12,} params  "
            f"{best * 1000:7.1f} ms/batch of {batch}",
            flush=True,
        )
        del model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="charles model",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd")
    show = sub.add_parser("show", help="print a preset's config as JSON")
    show.add_argument("name")
    sub.add_parser("fields", help="every ModelConfig field with its help")
    bench = sub.add_parser("bench", help="parameters and forward time per preset")
    bench.add_argument("names", nargs="*", help="presets (default: all)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)

    from charles.model.config import field_help
    from charles.model.presets import describe_preset, get_config, list_presets

    if args.cmd == "show":
        print(json.dumps(get_config(args.name).to_dict(), indent=2))
    elif args.cmd == "fields":
        for name, text in field_help().items():
            print(f"{name:22s} {text}")
    elif args.cmd == "bench":
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        _bench(args.names or list_presets(), args.device, args.batch, args.repeats)
    else:
        for name in list_presets():
            print(f"{name:30s} {describe_preset(name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
