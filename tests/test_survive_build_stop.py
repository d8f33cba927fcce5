"""A sim stopped while it builds its town ends at once, with status 0, and says so.

Building a town takes seconds (a default one ~3.5 s on a loaded 2-core box, the 8-block one here twice
that). The build asks the service's stop event between its steps and rows, so a SIGTERM during it ends the
process within a moment instead of after the build. Each process here is started from its real entry point
(survive_support.Stopper) with a big town, stopped right after its log says the build began, and must end
with status 0, well before the build could have finished, with the build given up (never finished). The player builds its town the same way; its process (torch
and timm to import: half a minute here) is left to tests/test_player_service.py, in process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from survive_support import wait_for

pytestmark = pytest.mark.slow

STOPPED_WITHIN_S = 2.0
"""SIGTERM to reaped. The stop itself takes ~0.3 s; the 8-block town's build alone takes ~5 s unloaded."""


@pytest.mark.parametrize(
    ("module", "argv", "warm"),
    [
        ("charles.collector.__main__", ["--id", "build-stop"], ["charles.collector.service"]),
        ("charles.sim.agent", ["--id", "build-stop"], []),
    ],
    ids=["collector", "sim-agent"],
)
def test_a_sim_stopped_while_it_builds_its_town_ends_at_once(stopper, module, argv, warm):
    s = stopper(module, argv, warm, CHARLES__SIM__BLOCKS="8")

    def building(log: Path) -> None:
        wait_for(
            lambda: "building the town" in log.read_text(errors="replace"), 30, f"no town build in {log}"
        )

    log = s.cycle(0, busy=building).read_text(errors="replace")
    assert "stopped while building the town" in log, log[-3000:]
    assert " built in " not in log, log[-3000:]
    assert s.stops[0] < STOPPED_WITHIN_S, f"the stop took {s.stops[0]:.2f} s\n{log[-3000:]}"
    s.report(module)
