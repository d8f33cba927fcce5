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
