"""Benchmark the player as a process of its own: predictions per second and latency, against a bare forward.

    python bench/player.py [--quick] [--profile] [--strict] [--inflight N]

**Headline** (``pps``, ``latency_p50_ms``, ``latency_p99_ms``, ``ratio_to_bare``). A broker, the built-in
sim as a game process (``python -m charles.sim.agent --lockstep --ahead --inflight 2``) and the player in
remote mode (``player.source: remote``, as against GTA V) run as separate processes: tiny preset at 160x90,
one torch thread each, the Player Console at its normal 5 Hz.
Lockstep with two frames in flight (``--inflight 2``): the game sends the next frame the moment an action
is in, and keeps two out unanswered, so the player finds the next frame waiting when it finishes one (never
idle for want of a frame) and the round trip through the broker is off its loop, as a game that does not
wait for the pad is. Each action says which frame it answers (``Action.frame_seq``), so latency is exact;
the player takes the newest frame it has and may skip one (``unanswered_frames``). ``--strict``: one frame
in flight and the game's own work on the loop too (frame -> player -> action -> step -> next frame).
``--ahead`` (on unless ``--strict``): the sim agent moves its world and draws the next frame while the
player thinks (as a game on its own machine does), so the game's work is off the loop wherever the box
has a core for it.

The bench listens on the bus: ``pps`` is actions per second; latency is from a GameFrame's send (its
header's monotonic ``t``, comparable between processes on one host) to the Action for it arriving
(``latency_p50_to_send_ms``: to the Action's send); ``player_latency_ms`` is the player's own (frame
received -> action decided, from its console); ``loop_ms`` = 1000 / ``pps`` against ``bare_ms``. ``*_cpu_ms_per_frame`` is each process's CPU time
per answered frame (all its threads, from /proc), which other load on a shared box inflates far less than wall time:
``ratio_to_bare_cpu`` = bare forward CPU time / player process CPU time per frame, the player's own cost
whatever the box.

The player folds batch norm into the convolutions when it loads weights (``bn_folded``; the same outputs
to float rounding, one op less per layer). ``bare_pps`` is the network as built, unfolded: what a plain timm
forward costs. ``bare_folded_pps`` is the player's folded net run bare, so ``ratio_to_bare_folded`` is the
loop's own overhead, whatever folding bought.

In the same run the same model's bare forward (batch 1, ``torch.inference_mode``, the same input size and
the channels_last layout the player feeds it; bench/_player.py) gives ``bare_pps``; ``ratio_to_bare = pps /
bare_pps`` (goal >= 0.9). Windows of the two alternate (the sim agent is paused with SIGSTOP while the bare
forward runs) and each figure is from the best window of its kind: a shared box is noisy.

The player's loop inside one process, with the sim's work on it, is bench/player_inprocess.py.

On a GPU: ``model_0004_inceptionresnetv2`` at 480x270 through the same processes, p99 latency goal <= 33 ms.

The last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from charles.runtime import free_ports  # noqa: E402

from _common import report  # noqa: E402
from _player import GPU_PRESET, bare_window, make_player, on_gpu, setup, warm_up  # noqa: E402

GAME_ID = "sim-bench"
PLAYER_ID = "player-bench"


# ---------------------------------------------------------------------------------------------- processes


def _die_with_the_bench() -> None:
    """Children get SIGKILL if the bench dies (a SIGSTOPped sim agent would otherwise linger)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Observer(threading.Thread):
    """A bystander on the bus: when each GameFrame was sent (its header's ``t``) and each Action arrived.

    Also keeps the player's newest console state (its own latency: frame received -> action decided).
    """

    def __init__(self, cfg, game_id: str, player_id: str):
        super().__init__(name="observer", daemon=True)
        self.cfg, self.game_id, self.player_id = cfg, game_id, player_id
        self.lock = threading.Lock()
        self.records: list[tuple[str, float, float, int | None]] = []
        """(kind, sender's t, our receipt, frame seq), in arrival order; cleared by take(). The frame seq of
        an action is the frame it answers (Action.frame_seq)."""
        self.console: dict = {}
        self.subscribed = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        from charles.runtime import Service

        svc = Service("bench", self.cfg, instance="bench-observer", http=False, signals=False)
        try:
            # the socket is made and used on this thread only
            sub = svc.subscriber(
                [f"game.{self.game_id}", f"action.{self.game_id}", f"console.{self.player_id}"],
                late_join=False,
            )
            self.subscribed.set()
            while not self.stopping.is_set():
                env = sub.recv(100)
                if env is None:
                    continue
                now = time.monotonic()
                if env.kind == "console":
                    self.console = env.msg.state
                    continue
                seq = env.msg.seq if env.kind == "game_frame" else env.msg.frame_seq
                with self.lock:
                    self.records.append((env.kind, env.t, now, seq))
        finally:
            svc.close()

    def take(self) -> list[tuple[str, float, float, int | None]]:
        with self.lock:
            out, self.records = self.records, []
        return out

    def close(self) -> None:
        self.stopping.set()
        self.join(timeout=3)


def match_latencies(
    records: list[tuple[str, float, float, int | None]],
) -> tuple[list[float], list[float], list[float], int]:
    """Each action paired with the frame it answers: the one its ``frame_seq`` names (else, as in plain
    lockstep, the newest frame sent and not yet answered).

    Returns (action receipt times, frame sent -> action received, frame sent -> action sent) in seconds, and
    how many frames the player did not answer (skipped for a newer one, or given up by the sim agent). An
    action whose frame was sent before the window is left out.
    """
    sent_at: dict[int, float] = {}
    answered: set[int] = set()
    newest: int | None = None
    arrivals, received, sent = [], [], []
    for kind, t, now, seq in records:
        if kind == "game_frame":
            if seq is not None:
                sent_at[seq] = t
                newest = seq
            continue
        if kind != "action":
            continue
        frame = seq if seq is not None else newest
        if frame is None or frame not in sent_at or frame in answered:
            continue
        answered.add(frame)
        arrivals.append(now)
        received.append(now - sent_at[frame])
        sent.append(t - sent_at[frame])
    last = max(answered, default=-1)
    unanswered = sum(1 for f in sent_at if f < last and f not in answered)
    return arrivals, received, sent, unanswered


class RemoteStack:
    """A broker, the sim agent (lockstep) and the player (remote) as processes of their own, plus an observer."""

    def __init__(
        self,
        preset: str,
        device: str,
        payload: bytes,
        model_cfg,
        *,
        ahead: bool = True,
        inflight: int = 2,
        console_hz: float = 5.0,
        threads: int = 1,
        player_profile: str | None = None,
    ):
        self.preset, self.device, self.payload, self.model_cfg = preset, device, payload, model_cfg
        self.ahead = ahead
        self.inflight = inflight
        self.tmp = tempfile.TemporaryDirectory(prefix="charles-bench-player-")
        names = ["publish", "subscribe", "control", "subscribe_bulk"]
        ports = free_ports(7)
        self.http = dict(zip(["broker", "player", "sim"], ports[4:], strict=True))
        self.data = {
            "bus": {"host": "127.0.0.1", "ports": dict(zip(names, ports[:4], strict=True))},
            "model": {"preset": preset},
            "player": {
                "source": "remote",
                "source_id": GAME_ID,
                "threads": threads,
                "terminal": False,
                "console_hz": console_hz,
                "device": device,
            },
            "unstuck": {"window_s": 1e6},  # as in process: untrained weights drive into walls
        }
        self.config = Path(self.tmp.name) / "charles.yaml"
        self.config.write_text(json.dumps(self.data))  # JSON is YAML
        self.player_profile = player_profile
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.observer: Observer | None = None
        self._svc = None

    # -- life cycle ------------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHARLES")}  # the file says it all
        env.update(OMP_NUM_THREADS="1", CHARLES__SERVICE__HTTP_PORT=str(self.http[name]))
        log = Path(self.tmp.name) / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as f:
            self.procs[name] = subprocess.Popen(
                [sys.executable, *args],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_the_bench,
            )

    def _state(self, name: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http[name]}/state", timeout=1) as r:
            return json.load(r)

    def _wait(self, what: str, pred, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {p.returncode}:\n{self.logs[name].read_text()[-3000:]}"
                    )
            try:
                if pred():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        tails = "\n".join(f"--- {n}\n{self.logs[n].read_text()[-1500:]}" for n in self.procs)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")

    def spawn(self) -> None:
        """Start the broker and the player (returns at once: they start while the bench warms up)."""
        self._spawn("broker", ["-m", "charles.broker", "--config", str(self.config)])
        player = ["-m", "charles.player", "--config", str(self.config), "--id", PLAYER_ID]
        if self.player_profile:
            player = ["-m", "cProfile", "-o", self.player_profile, *player]
        self._spawn("player", player)

    def ready(self, timeout: float = 120.0) -> None:
        """Weights to the broker; the game once the player waits for frames; drive until it predicts; pause.

        The game starts last so that its first frame finds the player listening: a lockstep frame nobody
        answers costs the whole timeout, and an answer after the timeout would put the loop one frame
        ahead of the player for good (with one frame in flight; the player's actions say which frame they
        answer, but an answer after a timeout still finds a newer frame out).
        """
        from charles import config
        from charles.proto import Weights
        from charles.runtime import Service

        cfg = config.load(data=self.data, environ={})
        self._svc = Service("bench", cfg, instance="bench-trainer", http=False, signals=False)
        pub = self._svc.publisher("weights")
        w = Weights(
            self.preset, f"{self.preset}_bench", 1, self.model_cfg.to_dict(), self.payload, time.time()
        )

        def held() -> bool:  # the broker keeps it as the last value (the player may subscribe after)
            pub.send(f"weights.{self.preset}", w)
            return bool(self._svc.snapshot([f"weights.{self.preset}"], timeout_s=0.5))

        self._wait("the broker to hold the weights", held, timeout)
        self.observer = Observer(cfg, GAME_ID, PLAYER_ID)
        self.observer.start()
        self.observer.subscribed.wait(10)
        self._wait(
            "the player to wait for frames",
            lambda: "waiting for frames" in self._state("player")["info"].get("status", ""),
            timeout,
        )
        self._spawn(
            "sim",
            [
                "-m",
                "charles.sim.agent",
                "--config",
                str(self.config),
                "--id",
                GAME_ID,
                "--lockstep",
                "--timeout",
                "5",
                *(["--ahead"] if self.ahead else []),
                "--inflight",
                str(self.inflight),
            ],
        )

        def driving() -> bool:
            info = self._state("player")["info"]
            return info.get("model_batch") == 1 and info.get("pps", 0) > 0

        self._wait("the player to drive the sim agent", driving, timeout)
        self.pause()

    def pause(self) -> None:
        """Stop the game (SIGSTOP): the player idles waiting for frames, the broker has nothing to forward."""
        self.procs["sim"].send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.procs["sim"].send_signal(signal.SIGCONT)

    def close(self) -> None:
        for name in ("sim", "player", "broker"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            if name == "sim":
                p.send_signal(signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.observer is not None:
            self.observer.close()
        if self._svc is not None:
            self._svc.close()
        self.tmp.cleanup()

    # -- measuring -------------------------------------------------------------------------------------

    def window(self, seconds: float, settle_s: float = 0.3) -> dict:
        """Run the game for ``seconds`` (after ``settle_s``) and say what the bus saw."""
        assert self.observer is not None
        self.resume()
        time.sleep(settle_s)
        pids = {n: p.pid for n, p in self.procs.items()}
        self.observer.take()
        c0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
        time.sleep(seconds)
        c1 = {n: cpu_seconds(pid) for n, pid in pids.items()}
        records = self.observer.take()
        self.pause()
        arrivals, received, sent, unanswered = match_latencies(records)
        n_frames = sum(1 for r in records if r[0] == "game_frame")
        n = len(arrivals)
        pps = (n - 1) / (arrivals[-1] - arrivals[0]) if n > 1 and arrivals[-1] > arrivals[0] else 0.0
        rec = np.asarray(received) * 1000.0
        snd = np.asarray(sent) * 1000.0
        out = {
            "pps": pps,
            "p50": float(np.percentile(rec, 50)) if n else float("nan"),
            "p99": float(np.percentile(rec, 99)) if n else float("nan"),
            "p50_sent": float(np.percentile(snd, 50)) if n else float("nan"),
            "frames": n_frames,
            "actions": n,
            "unanswered": unanswered,
            # per answered frame: what one prediction costs each process (skipped frames cost the game too)
            "cpu_ms": {k: (c1[k] - c0[k]) / max(1, n) * 1000.0 for k in pids},
        }
        lat = self.observer.console.get("latency_ms")
        if lat:
            out["player_own"] = lat
        return out


# ---------------------------------------------------------------------------------------------- the run


def run(
    preset: str,
    device: str,
    frames: int,
    repeats: int,
    seconds: float,
    ahead: bool = True,
    prof: bool = False,
    inflight: int = 2,
) -> dict:
    from charles.model.weights import save_weights

    svc, service = make_player(preset, device)  # the weights it sends, and the bare forward to compare
    prof_path = (
        str(Path(tempfile.gettempdir()) / f"charles-bench-player-{os.getpid()}.prof") if prof else None
    )
    payload = save_weights(service.swapper.predictors[0].model, service.cfg, half=True)
    stack = RemoteStack(
        preset, device, payload, service.cfg, ahead=ahead, inflight=inflight, player_profile=prof_path
    )
    try:
        stack.spawn()  # they start up while this process warms up its own player
        warm_up(service)
        stack.ready()
        stack.window(1.0)  # the remote player's first predictions and console pictures
        remotes, bares, bares_nchw, bares_folded = [], [], [], []
        for _ in range(repeats):
            remotes.append(stack.window(seconds))
            bares.append(bare_window(service, frames))
            bares_nchw.append(bare_window(service, frames, channels_last=False))
            bares_folded.append(bare_window(service, frames, folded=True))
        remote = max(remotes, key=lambda r: r["pps"])
        bare = max(b[0] for b in bares)
        bare_cpu = min(b[1] for b in bares)
        cpu = {k: min(r["cpu_ms"][k] for r in remotes) for k in remote["cpu_ms"]}
        return {
            "pps": round(remote["pps"], 1),
            "latency_p50_ms": round(remote["p50"], 2),
            "latency_p99_ms": round(remote["p99"], 2),
            "ratio_to_bare": round(remote["pps"] / bare, 3),
            "bare_pps": round(bare, 1),
            "game": "lockstep" + (", ahead" if ahead else "") + f", {inflight} in flight",
            "loop_ms": round(1000.0 / remote["pps"], 3) if remote["pps"] else None,
            "bare_ms": round(1000.0 / bare, 3),
            "unanswered_frames": sum(r["unanswered"] for r in remotes),
            "latency_p50_to_send_ms": round(remote["p50_sent"], 2),
            "player_latency_ms": remote.get("player_own"),
            "player_cpu_ms_per_frame": round(cpu["player"], 3),
            "sim_agent_cpu_ms_per_frame": round(cpu["sim"], 3),
            "broker_cpu_ms_per_frame": round(cpu["broker"], 3),
            "bare_cpu_ms": round(bare_cpu, 3),
            "ratio_to_bare_cpu": round(bare_cpu / cpu["player"], 3) if cpu["player"] > 0 else None,
            "bare_pps_nchw": round(max(b[0] for b in bares_nchw), 1),
            "bn_folded": service.swapper.active.fold_bn,
            "bare_folded_pps": round(folded := max(b[0] for b in bares_folded), 1),
            "ratio_to_bare_folded": round(remote["pps"] / folded, 3),
            "preset": preset,
            "input": [service.cfg.width, service.cfg.height],
            "device": str(service.swapper.active.device),
            "frames": frames,
            "window_s": seconds,
            "console_hz": service.config.console_hz,
        }
    finally:
        stack.close()
        service.shutdown()
        svc.close()
        if prof_path and Path(prof_path).exists():
            import pstats

            print("--- the remote player process (main thread), cumulative", file=sys.stderr)
            pstats.Stats(prof_path, stream=sys.stderr).sort_stats("cumulative").print_stats(35)
            pstats.Stats(prof_path, stream=sys.stderr).sort_stats("tottime").print_stats(25)
            os.unlink(prof_path)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="the player as a process: predictions per second and latency")
    ap.add_argument("--quick", action="store_true", help="finish in under 30 seconds")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the player process to stderr")
    ap.add_argument(
        "--strict",
        action="store_true",
        help="plain lockstep: one frame in flight, the sim agent's world step and drawing on the loop too",
    )
    ap.add_argument(
        "--inflight", type=int, default=2, help="frames the game has out unanswered at once (default 2)"
    )
    ap.add_argument(
        "--gpu-presets",
        default=GPU_PRESET,
        help=f"comma-separated model lines measured on CUDA (default {GPU_PRESET}); the first is the JSON's "
        "gpu, every one is in gpu_presets",
    )
    args = ap.parse_args()
    inflight = 1 if args.strict else args.inflight
    setup()
    frames, repeats, seconds = (120, 4, 1.0) if args.quick else (600, 5, 4.0)
    t0 = time.perf_counter()
    out = run("tiny", "cpu", frames, repeats, seconds, not args.strict, args.profile, inflight)
    print(
        f"tiny {out['input'][0]}x{out['input'][1]} on {out['device']}, player as a process: {out['pps']} pps, "
        f"latency p50 {out['latency_p50_ms']} ms p99 {out['latency_p99_ms']} ms; bare forward {out['bare_pps']}/s "
        f"-> ratio {out['ratio_to_bare']} (folded bare {out['bare_folded_pps']}/s -> {out['ratio_to_bare_folded']}); CPU per frame: player {out['player_cpu_ms_per_frame']} ms "
        f"(bare {out['bare_cpu_ms']} ms, ratio {out['ratio_to_bare_cpu']}), sim agent "
        f"{out['sim_agent_cpu_ms_per_frame']} ms, broker {out['broker_cpu_ms_per_frame']} ms",
        file=sys.stderr,
    )

    presets = [p for p in args.gpu_presets.split(",") if p]

    def gpu_run(preset: str) -> dict:
        quick = (150, 2, 2.0) if args.quick else (600, 3, 4.0)
        gpu = run(preset, "cuda", *quick, not args.strict, inflight=inflight)
        gpu["p99_goal_met"] = gpu["latency_p99_ms"] <= 33.0
        return gpu

    out["gpu_presets"] = {p: on_gpu(lambda p=p: gpu_run(p), p) for p in presets}
    out["gpu"] = out["gpu_presets"][presets[0]] if presets else "skipped: no preset asked for"
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    report(out)


if __name__ == "__main__":
    main()
