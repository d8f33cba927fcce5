"""``charles``: one command for every service and tool.

Subcommands import their module only when chosen, so ``charles broker`` never imports torch.
"""

from __future__ import annotations

import importlib
import re
import sys

# name -> (module with main(argv), one-line help). The order is the order of `charles --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("charles.launcher", "run the whole pipeline locally, every service a process on loopback"),
    "broker": ("charles.broker.__main__", "the central server (XSUB/XPUB, last values, config, CURVE)"),
    "collector": ("charles.collector.__main__", "drive a game instance with an NPC and stream samples"),
    "balancer": ("charles.balancer.__main__", "keep a balanced mix of samples for the trainer"),
    "trainer": ("charles.trainer.__main__", "buffers, training, checkpoints, weights for players"),
    "player": ("charles.player.__main__", "drive with the newest weights; Convcam and console"),
    "viewer": ("charles.viewer.__main__", "the stream layout as a web page"),
    "judge": ("charles.judge.__main__", "drive the newest weights on held-out towns: the live driving score"),
    "clip": (
        "charles.viewer.clip",
        "the player's cinematic camera to MP4, or highlights: before each Unstuck, swap",
    ),
    "config": ("charles.tools", "show the resolved configuration (charles config show)"),
    "keys": ("charles.tools", "make CURVE key pairs for the broker and agents"),
    "eval": ("charles.evaluate", "drive the sim with a policy and print its driving figures"),
    "record": ("charles.record", "write what crosses the bus (sample.* or set.*) to a dataset of tar shards"),
    "dataset": (
        "charles.balancer.dataset",
        "a recorded dataset: info (counts, sources, labels), plot (histograms)",
    ),
    "balance-plot": ("charles.balancer.plot", "histograms of the raw and balanced streams as PNG"),
    "stream": ("charles.trainer.stream", "put a saved checkpoint (version@batch) on the bus for players"),
    "models": (
        "charles.trainer.models_list",
        "model lines, versions, periods (streamed or off-stream), what players drive now",
    ),
    "model": ("charles.model.__main__", "the presets: show one, list every model field, measure them here"),
    "validate": ("charles.validate", "check compose, k8s and Prometheus files against the topic registry"),
    "sim-agent": ("charles.sim.agent", "the sim as a remote game: frames out, gamepad actions in"),
    "capture-agent": ("charles.agents.capture", "(Windows) capture a game window and its telemetry"),
    "gamepad-agent": ("charles.agents.gamepad", "(Windows) apply the player's actions to a virtual gamepad"),
}


_LITERAL = re.compile(r"``(.+?)``", re.S)
_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def help_text(doc: str | None) -> str:
    """A module docstring as ``--help`` shows it: the reST markup (double backticks, ``:mod:`` roles, a
    literal block's ``::``) removed, so a terminal reads plain text."""
    text = _ROLE.sub(r"\1", _LITERAL.sub(r"\1", doc or ""))
    return re.sub(r"(\S)::$", r"\1:", text, flags=re.M)


def version() -> str:
    """``charles <package version> (<git describe>)``; the checkout's part only where there is one."""
    from charles.version import git_describe, package_version

    described = git_describe()
    return f"charles {package_version()}" + (f" ({described})" if described else "")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: charles <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "charles <command> --help shows a command's options; charles --version which code this is."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"charles: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"charles {name}: not built yet ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    if module_name == "charles.tools":
        return int(module.main([name, *rest]) or 0)
    return int(module.main(rest) or 0)


def entry() -> None:
    """The ``charles`` console script: ``main``, then the process ends the way every service ends."""
    from charles.runtime import run_main

    run_main(main)


if __name__ == "__main__":
    entry()
