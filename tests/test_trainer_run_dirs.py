"""Containers put checkpoints and storage on volumes of their own; locally they live inside the run."""

from charles.trainer.runs import RunDir


def test_checkpoints_and_storage_follow_their_volume_roots(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "runs" / "tiny" / "tiny_v3")
    assert run.checkpoints == tmp_path / "runs/tiny/tiny_v3/checkpoints"
    assert run.storage == tmp_path / "runs/tiny/tiny_v3/storage"
    monkeypatch.setenv("CHARLES_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("CHARLES_STORAGE_DIR", str(tmp_path / "fast"))
    assert run.checkpoints == tmp_path / "ckpt/tiny/tiny_v3"
    assert run.storage == tmp_path / "fast/tiny/tiny_v3"
    assert run.tb == tmp_path / "runs/tiny/tiny_v3/tb"  # TensorBoard stays on the runs volume


def test_a_checkpoint_on_its_own_volume_is_recorded(tmp_path, monkeypatch):
    """docker-compose's trainer (CHARLES_CHECKPOINT_DIR=/runs/checkpoints) failed at every checkpoint:
    the manifest wanted the checkpoint's path relative to the run directory, which it is not inside."""
    monkeypatch.setenv("CHARLES_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    run = RunDir(tmp_path / "runs" / "tiny" / "tiny_v3")
    run.create(model={"name": "tiny"})
    run.start_period(0)
    ckpt = run.checkpoints / "batch_000000004"
    run.stop_period(4, 32, ckpt, published=4)
    assert RunDir(run.path).manifest.checkpoint == str(ckpt)
    inside = run.path / "checkpoints" / "batch_000000008"  # locally: relative, as before
    run.progress(8, 64, inside)
    assert RunDir(run.path).manifest.checkpoint == "checkpoints/batch_000000008"
