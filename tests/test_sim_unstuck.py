"""Unstuck: fires on a blocked car (position or speed telemetry), never on a moving one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charles.drive.unstuck import Phase, Unstuck, UnstuckConfig

DT = 1 / 30
CFG = UnstuckConfig(
    min_distance_m=5.0, window_s=10.0, fade_out_s=0.5, settle_s=1.0, fade_in_s=0.5, grace_s=2.0
)


def run(u: Unstuck, seconds: float, pos=None, speed=None, t0: float = 0.0):
    steps = []
    for k in range(int(round(seconds / DT))):
        t = t0 + k * DT
        p = pos(t) if callable(pos) else pos
        steps.append(u.update(t, position=p, speed=speed))
    return steps


def test_blocked_car_goes_through_every_phase_once():
    u = Unstuck(CFG)
    steps = run(u, 14.0, pos=(3.0, 4.0))
    phases = [s.phase for s in steps]
    first_fade = phases.index(Phase.FADE_OUT)
    assert first_fade * DT == pytest.approx(10.0, abs=2 * DT)  # the window
    assert all(p is Phase.DRIVE for p in phases[:first_fade])
    assert [s.teleport for s in steps].count(True) == 1 and u.unstucks == 1
    order = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
    assert order == [Phase.DRIVE, Phase.FADE_OUT, Phase.TELEPORT, Phase.SETTLE, Phase.FADE_IN, Phase.DRIVE]
    fades = [s.fade for s in steps]
    assert min(fades) == 0.0 and fades[-1] == 1.0
    fade_out = [s.fade for s in steps if s.phase is Phase.FADE_OUT]
    assert fade_out == sorted(fade_out, reverse=True)  # monotonic fade to black
    assert not any(s.driving for s in steps if s.phase is not Phase.DRIVE)


def test_after_a_teleport_the_clock_restarts_with_grace():
    u = Unstuck(CFG)
    teleported_at = []

    def pos(t: float) -> tuple[float, float]:  # the car moves only by being teleported
        return (50.0, 50.0) if teleported_at and t > teleported_at[0] else (0.0, 0.0)

    steps, t = [], 0.0
    while t < 23.9:  # 10 s stuck + 2 s of recovery + 10 s window + 2 s grace = 24 s
        s = u.update(t, position=pos(t))
        if s.teleport:
            teleported_at.append(t)
        steps.append(s)
        t += DT
    resume = next(i for i, s in enumerate(steps) if i and s.driving and not steps[i - 1].driving) * DT
    # 10 s window + 0.5 fade + 1 settle + 0.5 fade; each phase ends on the first tick past its time
    assert resume == pytest.approx(12.0, abs=5 * DT)
    assert all(s.driving for s in steps[int(resume / DT) :]) and u.unstucks == 1
    run(u, 0.5, pos=(50.0, 50.0), t0=24.0)
    assert u.unstucks == 1 and u.phase is not Phase.DRIVE  # and now the stuck clock has run out


def test_moving_car_never_triggers():
    u = Unstuck(CFG)
    steps = run(u, 120.0, pos=lambda t: (3.0 * t, 0.0))  # 3 m/s: 30 m per window
    assert all(s.driving for s in steps) and u.unstucks == 0


def test_slow_creep_below_the_distance_triggers():
    u = Unstuck(CFG)
    run(u, 12.0, pos=lambda t: (0.4 * t, 0.0))  # 4 m in 10 s: not enough
    assert u.unstucks == 1


def test_speed_only_variant():
    moving = Unstuck(CFG)
    assert all(s.driving for s in run(moving, 60.0, speed=2.0))
    stopped = Unstuck(CFG)
    steps = run(stopped, 13.0, speed=0.0)
    assert stopped.unstucks == 1 and any(s.teleport for s in steps)
    creeping = Unstuck(CFG)
    run(creeping, 12.0, speed=0.3)
    assert creeping.unstucks == 1


def test_trigger_forces_an_unstuck_now():
    u = Unstuck(CFG)
    run(u, 1.0, pos=lambda t: (10 * t, 0.0))
    u.trigger()
    s = u.update(1.0, position=(10.0, 0.0))
    assert s.phase is Phase.FADE_OUT and u.forced == 1


def test_needs_position_or_speed():
    with pytest.raises(ValueError):
        Unstuck(CFG).update(0.0)


@settings(max_examples=40, deadline=None)
@given(speed=st.floats(0.6, 40.0), seconds=st.floats(11.0, 40.0))
def test_any_steady_speed_over_half_a_metre_per_second_never_triggers(speed, seconds):
    u = Unstuck(CFG)
    steps = run(u, seconds, pos=lambda t: (speed * t, 0.0))
    assert all(s.driving for s in steps)
