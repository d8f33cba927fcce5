"""``charles up`` / ``make run``: every service as a process on loopback, one live console, clean Ctrl-C.

The same topology as docker-compose.yml and k8s/ (all read proto/registry.yaml): a broker, N sim
collectors, the balancer, the trainer, the player, the viewer and the judge. The process table below is a flat,
declarative list; a service whose package is not built yet is skipped with a note. A child that dies is
restarted with a back-off (like compose's ``restart: unless-stopped``), and counted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from charles.cli import help_text
from charles.proto import registry
from charles.runtime import free_ports

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "demo.yaml"
"""`make run`'s configuration when none is given: the repo's CPU demo (a checkout; an installed package has none)."""


@dataclass
class Proc:
    name: str
    """Display name, unique (collector-1, collector-2, ...)."""
    service: str
    """Service in the registry."""
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    log: Path | None = None


def _built(service: str) -> bool:
    module = registry().services[service].module
    try:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    except ModuleNotFoundError:
        return False


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _write_json(path: Path, obj: object) -> None:
    """Replace the file whole (temp file + rename): a reader polling it never sees it half written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def plan(args: argparse.Namespace, built: Callable[[str], bool] | None = None) -> list[Proc]:
    """The process table: which services run, with which ids and seeds.

    ``built`` says whether a service's package is there (default: look); charles.topology plans as if all
    were, without touching the file system or the ports.
    """
    built = built or _built
    procs = [Proc("broker", "broker")]
    for i in range(1, args.collectors + 1):
        procs.append(
            Proc(f"collector-{i}", "collector", ["--id", f"collector-{i}", "--seed", str(args.seed + i)])
        )
    procs.append(Proc("balancer", "balancer"))
    procs.append(Proc("trainer", "trainer", ["--preset", args.preset]))
    if not args.no_player:
        procs.append(Proc("player", "player", ["--preset", args.preset, "--seed", str(args.seed + 1000)]))
    if not args.no_viewer:
        procs.append(Proc("viewer", "viewer"))
    if not getattr(args, "no_judge", False):
        # the live driving score (niced by its own judge.nice): the trainer's line on held-out towns
        procs.append(Proc("judge", "judge", ["--preset", args.preset]))
    return [p for p in procs if built(p.service)]


def registry_http_ports(procs: list[Proc]) -> dict[str, int]:
    """Each process's /metrics port by the registry: collectors share one registry port, so replica k >= 2
    takes the registry port + 100 + (k - 1) (deploy/prometheus.local.yml lists those)."""
    reg = registry()
    ports = {}
    k = 0
    for p in procs:
        base = reg.services[p.service].http_port
        if p.service == "collector":
            k += 1
            ports[p.name] = base if k == 1 else base + 100 + (k - 1)
        else:
            ports[p.name] = base
    return ports


def child_env(args: argparse.Namespace, p: Proc, bus_ports: dict[str, int], http_port: int) -> dict[str, str]:
    """What the launcher sets in a child's environment, on top of its own (no side effects)."""
    env = {
        "PYTHONUNBUFFERED": "1",
        "CHARLES__BUS__HOST": "127.0.0.1",
        "CHARLES__BUS__PORTS": json.dumps(bus_ports),
        "CHARLES__SERVICE__HTTP_PORT": str(http_port),
        "CHARLES_RUN_DIR": str(Path(args.run_dir).resolve()),
        **p.env,
    }
    if args.config:
        env["CHARLES_CONFIG"] = str(Path(args.config).resolve())
    if getattr(args, "secure", False):
        # every service on CURVE with its role's key; the broker's plain ports on its own loopback only
        env["CHARLES__BUS__KEYS_DIR"] = str((Path(args.run_dir) / "keys").resolve())
        if p.service == "broker":
            env.update(CHARLES__BROKER__SECURE="true", CHARLES__BROKER__PLAIN="false")
            env["CHARLES__BROKER__SECURE_BIND"] = "127.0.0.1"
        else:
            env.update(CHARLES__BUS__SECURE="true", CHARLES__BUS__CLIENT_KEY=p.service)
    return env


class Launcher:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.procs = plan(args)
        self.stopping = False
        self.logs_dir = Path(args.logs)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        reg = registry()
        self.keys_dir = Path(args.run_dir) / "keys"
        if args.secure:
            from charles.tools import DEFAULT_CLIENTS, make_keys

            make_keys(self.keys_dir, DEFAULT_CLIENTS)  # kept across runs: made once
        if args.random_ports:
            names = list(reg.ports)
            self.bus_ports = dict(zip(names, free_ports(len(names)), strict=True))
            http = free_ports(len(self.procs))
            self.http_ports = {p.name: port for p, port in zip(self.procs, http, strict=True)}
        else:
            self.bus_ports = dict(reg.ports)
            busy = [
                p
                for p in ("publish", "subscribe", "control", "subscribe_bulk")
                if _port_busy(self.bus_ports[p])
            ]
            if busy:
                raise SystemExit(
                    f"charles up: port(s) {[self.bus_ports[b] for b in busy]} are taken — is another Charles running? "
                    "Stop it, or use --random-ports."
                )
            self.http_ports = registry_http_ports(self.procs)

    def _env(self, p: Proc) -> dict[str, str]:
        return {**os.environ, **child_env(self.args, p, self.bus_ports, self.http_ports[p.name])}

    def start(self, p: Proc) -> None:
        module = registry().services[p.service].module
        p.log = self.logs_dir / f"{p.name}.log"
        out = open(p.log, "ab")  # noqa: SIM115 - handed to the child; closed when we are
        p.popen = subprocess.Popen(
            [sys.executable, "-m", module, *p.args], env=self._env(p), stdout=out, stderr=subprocess.STDOUT
        )
        out.close()
        # every child's pid, for people and tests checking that nothing is left behind
        pids = {q.name: q.popen.pid for q in self.procs if q.popen is not None}
        _write_json(self.logs_dir / "pids.json", pids)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        skipped = [s for s in registry().services if not _built(s)]
        print(f"charles up: {len(self.procs)} processes, logs in {self.logs_dir}/", flush=True)
        if self.args.config:
            print(f"  run configuration: {self.args.config}", flush=True)
        # where everything listens (with --random-ports nobody else can know): tools and benches attach here
        ports = {"bus": self.bus_ports, "http": self.http_ports}
        _write_json(self.logs_dir / "ports.json", ports)
        if skipped:
            print(f"  not built yet, skipped: {', '.join(skipped)}", flush=True)
        for line in self.where_to_watch():
            print(f"  {line}", flush=True)
        for p in self.procs:
            self.start(p)
            if p.service == "broker":
                time.sleep(0.5)  # everyone else connects to it
        from charles.launcher_console import Console

        console = Console(self, self.bus_ports)
        deadline = time.monotonic() + self.args.minutes * 60 if self.args.minutes > 0 else None
        try:
            while not self.stopping:
                if deadline and time.monotonic() >= deadline:
                    print("charles up: time is up, stopping", flush=True)
                    break
                self._supervise()
                console.tick()
        finally:
            console.close()
            self.stop_all()
        return 0

    def watch_url(self) -> str | None:
        """The stream page's address (the viewer serves it on its HTTP port), if a viewer runs."""
        port = next((self.http_ports[p.name] for p in self.procs if p.service == "viewer"), None)
        return None if port is None else f"http://127.0.0.1:{port}"

    def where_to_watch(self) -> list[str]:
        """What a newcomer reads first: where to look, and what to expect when (the CPU demo's figures)."""
        lines = []
        if url := self.watch_url():
            lines.append(f"watch the car learn: {url}  (cameras, Convcam, consoles, loss)")
        run_dir = Path(self.args.run_dir)
        lines.append(f"loss curves: tensorboard --logdir {run_dir}  (then http://127.0.0.1:6006)")
        lines.append(
            "expect: samples at once; the first trained weights at the player (its console's model_batch) "
            "in about 1-2 minutes; how well it drives: make bench-e2e"
        )
        return lines

    def _supervise(self) -> None:
        now = time.monotonic()
        for p in self.procs:
            if p.popen is not None and p.popen.poll() is not None and not self.stopping:
                rc = p.popen.returncode
                p.restarts += 1
                delay = min(30.0, 2.0 ** min(p.restarts, 5))
                print(
                    f"charles up: {p.name} exited ({rc}); restart #{p.restarts} in {delay:.0f}s — see {p.log}",
                    flush=True,
                )
                p.popen = None
                p.next_start = now + delay
            if p.popen is None and now >= p.next_start and not self.stopping:
                self.start(p)

    def _on_signal(self, *_: object) -> None:
        self.stopping = True

    def stop_all(self, timeout: float = 60.0) -> None:
        # generous: the trainer writes a final checkpoint and flushes its storage before it exits
        self.stopping = True
        alive = [p for p in self.procs if p.popen is not None and p.popen.poll() is None]
        # stop consumers before the broker so nobody logs reconnect noise while going down
        for p in sorted(alive, key=lambda p: p.service == "broker"):
            p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in alive:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"charles up: {p.name} did not stop in {timeout:.0f}s; killing it", flush=True)
                p.popen.kill()
                p.popen.wait()
        for p in alive:
            if p.popen.returncode != 0:  # a clean stop is status 0; the logs say what went wrong
                print(
                    f"charles up: {p.name} stopped with status {p.popen.returncode} — see {p.log}", flush=True
                )
        print("charles up: all stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="charles up",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--collectors", type=int, default=2, help="sim collectors to run (default 2)")
    ap.add_argument(
        "--preset", default="tiny", help="model preset for trainer and player (default: tiny, CPU-friendly)"
    )
    ap.add_argument("--minutes", type=float, default=0, help="stop after this long (0: until Ctrl-C)")
    ap.add_argument("--seed", type=int, default=0, help="base sim seed; collector i uses seed+i")
    ap.add_argument(
        "--config",
        help=f"run configuration file for every service (default: $CHARLES_CONFIG, else {DEMO_CONFIG} if it exists)",
    )
    ap.add_argument(
        "--run-dir", default="runs", help="checkpoints, storage and TensorBoard logs (default: runs/)"
    )
    ap.add_argument("--logs", default="runs/logs", help="one log file per process (default: runs/logs/)")
    ap.add_argument("--no-player", action="store_true", help="do not start the player")
    ap.add_argument("--no-viewer", action="store_true", help="do not start the viewer")
    ap.add_argument("--no-judge", action="store_true", help="do not start the judge (the live driving score)")
    ap.add_argument(
        "--random-ports", action="store_true", help="pick free ports instead of the registry's (tests)"
    )
    ap.add_argument("--plain", action="store_true", help="log lines instead of a redrawn console")
    ap.add_argument(
        "--secure",
        action="store_true",
        help="every service on CURVE with its role's key (made in <run-dir>/keys), the broker's plain ports "
        "on loopback only: what a key may publish and read is what its role may (proto/README.md)",
    )
    args = ap.parse_args(argv)
    if args.collectors < 0:
        ap.error("--collectors must be >= 0")
    if args.config is None and not os.environ.get("CHARLES_CONFIG") and DEMO_CONFIG.is_file():
        args.config = str(DEMO_CONFIG)  # the CPU demo: first trained weights at the player in ~2 minutes
    if shutil.which("nvidia-smi") is None:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    return Launcher(args).run()


if __name__ == "__main__":
    from charles.runtime import run_main

    run_main(main)
