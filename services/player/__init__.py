"""The player: drives a game with the newest weights at frame rate and shows what it sees and thinks.

- ``decide``   Decider: who drives each frame (the brake, the NPC expert, the model) and which frames teach.
- ``gamepad``  decoded outputs -> dead-zone compensated pad values.
- ``sources``  the game behind one interface: SimSource (built-in sim) and RemoteSource (GameFrames in,
  Actions out); both keep history, stacked frames and Unstuck exactly as the collectors and trainer do.
- ``swap``     Swapper (two predictors, swap between frames by policy) and WeightsFeed (the weights thread).
- ``console``  ConsolePainter (Player Console for the viewer, off the loop) and the terminal view.
- ``service``  PlayerService: the drive loop wired to the bus; PlayerMetrics.

Its section (PlayerConfig) is charles.sections.player; the policy is charles.drive.policy.ModelPolicy.
Imports: core, charles.proto, charles.drive, charles.sim, charles.model; no other service.
"""
