"""``python -m charles.trainer`` (``charles trainer``): buffers, training, checkpoints, weights for players.

    charles trainer --preset tiny                 resume the newest run of the line (v1 if none)
    charles trainer --preset tiny --new-version   start the line's next version from scratch
    charles trainer --preset tiny --version 3     train (or resume) tiny_v3
    charles trainer --preset tiny --resume v3@1200   continue tiny_v3 from its checkpoint of batch 1200 as a
                                                  new period (newer checkpoints move aside, kept)
    charles trainer --preset tiny --set trainer.publish=off   train off-stream: checkpoints, no weights on
                                                  the bus (`charles stream tiny_v3@1200` streams one later)
    CHARLES__TRAINER__PROCS=4 charles trainer     four processes, one per GPU: it starts torchrun itself
    torchrun --nproc_per_node 4 -m charles.trainer --preset model_0004_inceptionresnetv2   (the same, by hand)

Runs live under $CHARLES_RUN_DIR (default runs/): runs/<line>/<line>_v<N>/ (see charles.trainer.runs).
"""

from __future__ import annotations

import argparse
import sys

from charles import config as config_mod
from charles.cli import help_text
from charles.runtime import Service, default_instance, run_main, setup_logging
from charles.trainer.buffers import buffer_names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="charles trainer",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_mod.add_arguments(ap)
    ap.add_argument("--id", help="instance id (heartbeat.<id>, console.<id>); default: trainer-<hostname>")
    ap.add_argument("--preset", help="model line to train (sets model.preset; `charles models` lists runs)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="train this version of the line (created if missing)")
    which.add_argument(
        "--new-version", action="store_true", help="start the line's next version from scratch"
    )
    which.add_argument(
        "--resume",
        metavar="VERSION[@BATCH]",
        help="continue an existing version (v3, 3 or <line>_v3) from its newest checkpoint, or from the "
        "one of BATCH, as a new training period",
    )
    ap.add_argument("--run-dir", help="where runs live (default: $CHARLES_RUN_DIR or runs/)")
    ap.add_argument(
        "--console", action="store_true", help="live console on the terminal (when stdout is a TTY)"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)

    overrides = list(args.set)
    if args.preset:
        overrides.append(f"model.preset={args.preset}")
    try:
        cfg = config_mod.load(args.config, overrides=overrides)
        mcfg = cfg.model.resolve()
        balanced = cfg.balancer.output_specs(mcfg.outputs)  # the line's classes and the balancer's bins agree
        cfg.trainer.batch_for(len(buffer_names([s.name for s in balanced], int(cfg.balancer.version))))
    except ValueError as e:
        print(f"charles trainer: configuration error: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.service.log_level, cfg.service.log_format)

    from charles.trainer import launch

    if not launch.is_worker():
        try:
            procs = launch.processes(cfg.trainer.procs, cfg.trainer.device)
        except ValueError as e:
            print(f"charles trainer: configuration error: {e}", file=sys.stderr)
            return 2
        if procs > 1:
            return launch.run_ranks(procs, argv)

    # Heavy imports after the configuration is known to be good: torch, timm and the model.
    import torch

    from charles.trainer.checkpoint import CheckpointError
    from charles.trainer.console import TerminalConsole
    from charles.trainer.runs import RunError, open_for_training
    from charles.trainer.service import TrainerService
    from charles.trainer.training import Distributed
    from charles.version import code_version

    if cfg.trainer.torch_threads:
        torch.set_num_threads(cfg.trainer.torch_threads)
    dist = Distributed.from_env(cfg.trainer.device)
    rank = dist.rank if dist else 0
    version, resume_batch = args.version, None
    try:
        if args.resume is not None:
            version, resume_batch = resumable(args.resume, mcfg, args.run_dir)
        run = open_for_training(
            mcfg.name,
            args.run_dir,
            version=version,
            new=args.new_version,
            model=mcfg.to_dict(),
            identity=mcfg.identity(),
            name=cfg.run,
            rank=rank,
            broadcast=dist.broadcast_int if dist is not None else None,
        )
        if resume_batch is not None and rank == 0:
            moved = run.rewind(resume_batch)
            if moved:
                print(
                    f"charles trainer: {len(moved)} newer checkpoint(s) of {run.name} moved aside to "
                    f"{moved[0].parent}",
                    file=sys.stderr,
                )
    except (RunError, ValueError) as e:  # CheckpointError is a ValueError too
        print(f"charles trainer: {e}", file=sys.stderr)
        return 2

    instance = args.id or default_instance("trainer")
    if rank > 0:
        instance = f"{instance}-rank{rank}"
    terminal = None
    if args.console and rank == 0:
        if TerminalConsole.available():
            terminal = TerminalConsole()
        else:
            print("charles trainer: --console needs a terminal on stdout; logging instead", file=sys.stderr)
    svc = Service("trainer", cfg, instance, http=rank == 0)
    svc.log.info(f"training {run.name} in {run.path} ({code_version()})")
    try:
        service = TrainerService(svc, cfg, run, dist=dist, terminal=terminal)
        svc.start_heartbeat()
        service.run()
    except KeyboardInterrupt:
        pass
    except (CheckpointError, config_mod.ConfigError) as e:  # cannot resume, or start: say why, no traceback
        svc.log.error(f"cannot train {run.name}: {e}")
        return 2
    except Exception:
        svc.log.exception("the trainer failed")
        return 1
    finally:
        run.unlock()
        svc.close()
        if dist is not None:
            dist.close()
    return 0


def resumable(ref: str, mcfg, root: str | None) -> tuple[int, int | None]:
    """``--resume v3[@1200]`` -> (3, 1200 or None), after checking that the version exists and has that
    checkpoint, and that the checkpoint loads into this model (so nothing moves for a refused one);
    ValueError (RunError, CheckpointError) saying what was asked and what there is."""
    from charles.proto.versions import parse_ref
    from charles.trainer.checkpoint import list_checkpoints, read_checkpoint
    from charles.trainer.runs import locate

    version, batch = parse_ref(ref, mcfg.name)
    run = locate(mcfg.name, version, root)
    have = list_checkpoints(run.checkpoints)
    if not have:
        raise ValueError(f"{run.name} has no checkpoint to continue from (train it with --version {version})")
    path = have[-1][1] if batch is None else run.checkpoint_path(batch)
    read_checkpoint(path, mcfg)
    return version, batch


if __name__ == "__main__":
    run_main(main)
