"""The built-in driving simulator: the game stand-in, its NPC drivers, Gymnasium and evaluation.

Pure Python (numpy + OpenCV), no sockets: the collector, the player and ``charles eval`` wrap these classes.

Modules (import what you need; nothing is re-exported here so ``import charles.sim`` stays cheap):

- ``config``   SimConfig, NpcConfig: typed settings, every field with a one-line help.
- ``town``     the procedurally generated island town (streets, lanes, water, buildings), per seed, cached.
- ``car``      kinematic bicycle car, GTA-style combined throttle/brake, fixed 1/30 s step.
- ``render``   hood and chase cameras: ground homography warp + boxes; weather and time of day.
- ``world``    SimWorld: town + player car + traffic + purpose + teleport + cameras.
- ``npc``      Npc autopilot: routing, lane keeping, speed planning, proximity sensors, noise injection.
- ``session``  DriveSession: the 30 Hz loop shared by collector, player and eval (Unstuck + history).
- ``evaluate`` evaluate() / evaluate_gym() and the builtin policies; ``python -m charles.sim.evaluate``.
- ``gym_env``  DrivingEnv, ``Charles/Drive-v0`` (registered on import: ``gymnasium.make("charles.sim.gym_env:Charles/Drive-v0")``).
- ``car_racing`` an expert for Gymnasium's Box2D ``CarRacing-v3`` (``charles.sim.car_racing:expert``).
- ``agent``    ``python -m charles.sim.agent``: the sim as a remote game (GameFrames out, Actions in).

Unstuck (charles.drive.unstuck) and the history ring (charles.drive.past) are charles.drive's: the capture
agent and the player use them too.

A collector, in short::

    world = SimWorld(SimConfig(seed=replica_seed, weather="rain"))
    npc = Npc(world, cfg=NpcConfig())                      # noise on: recovery data
    session = DriveSession(world, UnstuckConfig())
    session.teleport_hooks.append(npc.reset)
    while True:                                            # 30 Hz of game time
        obs = session.observe()                            # hood frame (faded), speed, purpose, history
        label, executed = npc.act()
        session.step(executed)
        if obs.driving:
            emit(obs.frame, label, obs.speed, obs.purpose, obs.history)

The player is the same loop with ``executed = model(obs.frame, obs.speed, obs.purpose, obs.history)``.

Imports: core (charles.config, charles.runtime, charles.pad for the sim agent), charles.proto,
charles.drive; never a service, never charles.agents (what both need lives lower down).
"""
