"""A new run's weights: parts transferred from our checkpoints, ImageNet files, and refusals that name the
setting. The service test builds a real TrainerService (no training) on the test broker; the others call
``fresh_start``, the function the service uses, on a tiny model at 64x36."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch

from charles.config import ConfigError
from charles.model.net import build_model, torch_threads
from charles.model.presets import get_config
from charles.model.weights import read_weights
from charles.sections.trainer import TrainerConfig
from charles.trainer.initial import fresh_start
from charles.trainer.runs import open_run
from charles.trainer.service import TrainerService
from charles.trainer.training import Trainer

SMALL = {"width": 64, "height": 36}
MEMORY = {**SMALL, "history_length": 8, "history_lstm_units": 8}
BALANCER = {"version": 3, "outputs": ["steering", "throttle_brake"], "picture_s": 0}
TRAINER = {"batch_size": 4, "buffer": {"capacity": 32}, "decode_threads": 1, "prefetch": 1}


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def other_run_checkpoint(tmp_path, seed: int = 1):
    """A real checkpoint folder of another run of the memory line (batch 250)."""
    torch.manual_seed(seed)
    src = Trainer(get_config("tiny_memory", **MEMORY), TrainerConfig(), "cpu")
    src.batch = 250
    return src.save(tmp_path / "other_run" / "checkpoints")


def matrices(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Randomly initialised parameters (weight matrices and kernels; norm weights start equal everywhere)."""
    return {k: p for k, p in model.named_parameters() if k.startswith(prefix + ".") and p.dim() > 1}


def service_for(client_factory, tmp_path, **model):
    svc = client_factory(
        "trainer",
        trainer=TRAINER,
        balancer=BALANCER,
        model={"preset": "tiny_memory", "overrides": MEMORY, **model},
    )
    mcfg = svc.cfg.model.resolve()
    run = open_run(mcfg.name, tmp_path / "runs", model=mcfg.to_dict(), identity=mcfg.identity())
    return TrainerService(svc, svc.cfg, run)


def close(service: TrainerService) -> None:
    service.buffers.close()
    if service.storage is not None:
        service.storage.close()
    if service.tb is not None:
        service.tb.close()
    service.run_dir.unlock()


def test_a_new_run_takes_the_lstm_from_another_runs_checkpoint_and_a_resumed_run_its_own(
    client_factory, tmp_path, caplog
):
    ckpt = other_run_checkpoint(tmp_path)
    file = read_weights(ckpt / "weights.safetensors").state_dict
    torch.manual_seed(2)
    with caplog.at_level("INFO"):
        service = service_for(client_factory, tmp_path, transfer={"history.lstm": str(ckpt)})
    model = service.trainer.module
    assert service.resumed_from is None
    lstm = {k: v for k, v in model.state_dict().items() if k.startswith("history.lstm.")}
    assert lstm and all(torch.equal(v, file[k]) for k, v in lstm.items())
    for part in ("backbones", "trunks", "heads"):
        rest = matrices(model, part)
        assert rest and not any(torch.equal(v, file[k]) for k, v in rest.items()), part
    assert f"history.lstm <- {ckpt / 'weights.safetensors'}" in caplog.text
    assert "random init: backbones, trunks, heads" in caplog.text

    # the run goes on: its checkpoint, not the transfer file, is where a restart continues
    with torch.no_grad():
        model.history.lstm.weight_hh_l0.add_(1.0)
    service.trainer.batch = 3
    service.checkpoint()
    close(service)
    again = service_for(client_factory, tmp_path, transfer={"history.lstm": str(ckpt)})
    assert again.resumed_from is not None and again.trainer.batch == 3
    assert torch.equal(again.trainer.module.history.lstm.weight_hh_l0, file["history.lstm.weight_hh_l0"] + 1)
    close(again)


def test_transfer_and_imagenet_files_together_each_into_their_parts(tmp_path):
    ckpt = other_run_checkpoint(tmp_path)
    torch.manual_seed(11)
    imagenet = timm.create_model("regnetx_002", num_classes=1000)  # stands in for downloaded weights
    path = tmp_path / "regnetx_002.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(path))
    cfg = get_config("tiny_memory", **MEMORY, frames=3, pretrained=True, transfer=("rnn",))
    model = build_model(cfg.replace(pretrained=False))
    told = fresh_start(model, cfg, str(path), {"rnn": str(ckpt)})
    ref, file = imagenet.state_dict(), read_weights(ckpt / "weights.safetensors").state_dict
    net = model.backbones[0].net
    assert net.stem.conv.weight.shape[1] == 9  # three stacked frames: the first conv adapted, as timm does
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items() if k != "stem.conv.weight")
    assert all(torch.equal(v, file[f"history.lstm.{k}"]) for k, v in model.history.lstm.state_dict().items())
    assert "unused: head.fc.bias, head.fc.weight" in told and "random init: trunks, heads" in told


def test_presets_that_ask_for_files_are_refused_with_the_setting_named(tmp_path):
    pretrained = get_config("tiny", **SMALL, pretrained=True)
    model = Trainer(
        pretrained, TrainerConfig(), "cpu"
    ).module  # builds: the files come after the resume check
    with pytest.raises(ConfigError, match=r"^model.pretrained_file: .*never downloads"):
        fresh_start(model, pretrained)
    with pytest.raises(ConfigError, match=r"^model.pretrained_file: missing: no weights file"):
        fresh_start(model, pretrained, str(tmp_path / "nowhere.safetensors"))
    pickled = tmp_path / "imagenet.pth"
    torch.save(model.backbones[0].net.state_dict(), pickled)
    with pytest.raises(ConfigError, match=r"^model.pretrained_file: pickle: .*only loads safetensors"):
        fresh_start(model, pretrained, str(pickled))
    with pytest.raises(ConfigError, match="model.pretrained_file and model.transfer both set the backbones"):
        fresh_start(model, pretrained, str(pickled), {"cnn": str(pickled)})

    # the model_0009 shape: two parts from other runs, a file for only one of them
    tl = get_config("tiny_memory", **MEMORY, transfer=("backbones", "history.lstm"))
    model = build_model(tl)
    ckpt = other_run_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match=r"^model.transfer: .*no file is given for history.lstm"):
        fresh_start(model, tl, transfer={"backbones": str(ckpt)})
    with pytest.raises(ConfigError, match=r"^model.transfer.history.lstm: no weights file at"):
        fresh_start(model, tl, transfer={"backbones": str(ckpt), "history.lstm": str(tmp_path / "x")})
    with pytest.raises(ConfigError, match=r"^model.transfer: pickle"):
        fresh_start(model, tl, transfer={"backbones": str(ckpt), "history.lstm": str(pickled)})
    with pytest.raises(ConfigError, match=r"^model.transfer: model has no part 'decoder'"):
        fresh_start(model, tl, transfer={"decoder": str(ckpt)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tiny_ckpt = Trainer(get_config("tiny", **SMALL), TrainerConfig(), "cpu").save(tmp_path / "cnn_only")
    with pytest.raises(ConfigError, match=r"^model.transfer: part_mismatch: history.lstm"):
        fresh_start(model, tl, transfer={"backbones": str(ckpt), "history.lstm": str(tiny_ckpt)})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "all or nothing"
    assert "random init" in fresh_start(model, tl.replace(transfer=()))


def test_the_model_section_takes_transfer_as_part_to_path():
    from charles import config

    cfg = config.load(data={"model": {"transfer": {"rnn": "runs/b/batch_000250000"}}}, environ={})
    assert cfg.model.transfer == {"rnn": "runs/b/batch_000250000"} and cfg.model.pretrained_file == ""
    with pytest.raises(ConfigError, match="model.transfer: maps a part name to a file path"):
        config.load(data={"model": {"transfer": {"rnn": 3}}}, environ={})


@pytest.mark.slow
def test_the_entry_point_says_which_setting_is_missing_without_a_traceback(broker, tmp_path):
    _, data = broker
    env = {
        **os.environ,
        "CHARLES_RUN_DIR": str(tmp_path / "runs"),
        "CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"]),
        "CHARLES__SERVICE__HTTP_PORT": "0",
        "CHARLES__MODEL__OVERRIDES": json.dumps({**SMALL, "pretrained": True}),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "charles.trainer", "--preset", "tiny", "--set", "trainer.batch_size=4"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "cannot train tiny_v1: model.pretrained_file: tiny starts its backbone from ImageNet" in out
    assert "Traceback" not in out
