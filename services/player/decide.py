"""Who drives this frame, and whether it teaches: the player's decision table as a plain class.

Per frame, in this order of precedence:

=====================  ===========  =====================================================  ===============
the frame              driver       action                                                 status
=====================  ===========  =====================================================  ===============
Unstuck recovering     ``brake``    the brake (the stack still sees the faded frame)       ``unstuck: ...``
no weights yet         ``expert``   the NPC's corrective action (``before_weights: npc``)   waiting
no weights yet         ``brake``    the brake, and Unstuck held (standing on purpose)       waiting
weights loaded         ``model``    the policy's prediction on what the trainer saw         driving
=====================  ===========  =====================================================  ===============

A frame the model drove becomes a DAgger sample labelled with the expert's action (``player.dagger``: the
sim's NPC, or a remote game's autopilot when the game says what it wants), except when the car stands and
the expert would keep standing on the brake (``dagger_skip_standstill``): those frames teach nothing but
"stay stopped". A frame whose game cannot say what its expert wants (a mod without Charles' extension) is
counted ``unlabelled`` and never labelled with what was driven instead. :class:`Decider` holds no socket and no Service; the service
around it counts, publishes and paints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from charles.drive.policy import ModelPolicy
from charles.player.gamepad import BRAKE_PAD, Gamepad, to_gamepad
from charles.sim.session import BRAKE

STANDSTILL_MPS = 0.5
"""Below this speed the car stands (the NPC's own "stand still firmly" threshold)."""
FULL_BRAKE = -0.999
"""An expert throttle_brake at or below this is standing on the brake."""


class Game(Protocol):
    """What the decider asks of the player's source."""

    def expert(self) -> tuple[tuple[float, float], tuple[float, float]] | None: ...

    def hold_unstuck(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """What this frame does, and who decided it."""

    driver: Literal["brake", "expert", "model"]
    action: tuple[float, float]
    """(steering, throttle_brake) asked of the car."""
    pad: Gamepad
    """The same as gamepad values, past the dead zones."""
    status: str
    """For the console and the heartbeat."""
    raw: dict[str, Any] | None = None
    """The model's raw outputs (model frames only)."""
    stack: list[tuple[int, Any]] | None = None
    """(tick, picture) of the past frames before this one, when this frame may become a DAgger sample."""


class Decider:
    """The brake, the NPC expert or the model, per the table in the module docstring."""

    def __init__(
        self,
        policy: ModelPolicy,
        game: Game,
        *,
        before_weights: str = "brake",
        deadzones: dict[str, float] | None = None,
        dagger: bool = False,
        skip_standstill: bool = True,
    ):
        self.policy = policy
        self.game = game
        self.before_weights = before_weights
        self.deadzones = deadzones or {}
        self.dagger = dagger
        self.skip_standstill = skip_standstill
        self.skipped = 0
        """Model frames not taught: the car stood and the expert would have stood on the brake."""
        self.unlabelled = 0
        """Model frames not taught: the game did not say what its expert wanted (no label to give)."""

    def decide(self, view: Any, predictor: Any) -> Decision:
        """This frame's decision; ``predictor`` is the active one (None before the first weights)."""
        if not view.driving:
            self.policy.see(view.frame)  # the stacked past frames keep moving through the fades
            return Decision("brake", BRAKE, BRAKE_PAD, f"unstuck: {view.unstuck.phase.value}")
        if predictor is None:
            self.policy.see(view.frame)
            expert = self.game.expert() if self.before_weights == "npc" else None
            if expert is None:
                self.game.hold_unstuck()  # standing on the brake on purpose is not being stuck
                return Decision("brake", BRAKE, BRAKE_PAD, "waiting for weights")
            action = expert[1]
            pad = to_gamepad({"steering": action[0], "throttle_brake": action[1]}, self.deadzones)
            return Decision("expert", action, pad, "waiting for weights")
        stack = None
        if self.dagger and self.policy.stack.full:
            stack = self.policy.stack.past()  # before this frame joins it
        self.policy.predictor = predictor  # the swap, as the policy sees it: between two frames
        action = self.policy(view.frame, view.speed, view.purpose, view.history, view.previous)
        pad = to_gamepad(self.policy.last_controls, self.deadzones)
        return Decision("model", action, pad, "driving", self.policy.last_raw, stack)

    def demonstration(self, view: Any, decision: Decision) -> tuple[float, float] | None:
        """The expert's label when this frame becomes a DAgger sample, else None (ask before acting)."""
        if decision.stack is None:
            return None
        expert = self.game.expert()
        if expert is None:
            self.unlabelled += 1
            return None
        label = expert[0]
        if self.skip_standstill and view.speed < STANDSTILL_MPS and label[1] <= FULL_BRAKE:
            self.skipped += 1  # stopped, and the expert would stay stopped: no demonstration
            return None
        return label
