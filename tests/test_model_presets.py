"""Every preset builds, predicts at its own resolution, and trains (forward + backward) at a reduced one."""

from __future__ import annotations

import gc

import pytest
import torch

from charles.model.inputs import example_batch, prepare_batch
from charles.model.losses import compute_loss
from charles.model.net import build_model, count_parameters, torch_threads
from charles.model.presets import get_config, list_presets


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    # the test machine is shared: spinning OpenMP threads cost 10x (see torch_threads)
    with torch_threads(1):
        yield


# Parameters outside the backbone(s) that the seed's Keras summaries imply (total minus Keras' backbone):
# 0001/0002 v6: 23,799,371 - 20,861,480; 0003: 23,519,466 - 20,861,480; 0004-0006: 56,470,434 - 54,336,736;
# 0010: 112,381,058 - 2 x 54,336,736; 0011: 46,479,122 - 2 x 20,861,480.
SEED_DENSE_PARAMS = {
    "model_0001_xception": 2_937_891,
    "model_0002_xception": 2_937_891,
    "model_0003_xception": 2_657_986,
    "model_0004_inceptionresnetv2": 2_133_698,
    "model_0005_inceptionresnetv2": 2_133_698,
    "model_0006_inceptionresnetv2": 2_133_698,
    "model_0010_irv2_tcb": 3_707_586,
    "model_0011_x_tcb": 4_756_162,
}
# IRv2 reduces a 96x96 input to 1x1; smaller inputs do not survive its unpadded convolutions.
REDUCED = {"inception_resnet_v2": (96, 96), "legacy_xception": (64, 36), "regnety_040": (64, 64)}
BIG = [n for n in list_presets() if get_config(n).backbone in REDUCED]


def _train_step(cfg, batch_size: int = 2) -> None:
    model = build_model(cfg).train()
    out = model(**prepare_batch(example_batch(cfg, batch_size), cfg))
    loss, per = compute_loss(out, {n: torch.zeros(batch_size) for n in cfg.output_names}, cfg.outputs)
    loss.backward()
    assert torch.isfinite(loss) and set(per) == set(cfg.output_names)
    head = next(iter(model.heads.values())).out.weight
    assert head.grad is not None and head.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG)
def test_seed_preset_builds_predicts_and_trains(name):
    cfg = get_config(name, pretrained=False)  # model_0005's ImageNet file is not here; its network is
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    dense = count_parameters(model) - count_parameters(model.backbones)
    if name in SEED_DENSE_PARAMS:
        assert dense == SEED_DENSE_PARAMS[name]
    with torch.inference_mode():  # the default resolution, as the player runs it
        out = model(**prepare_batch(example_batch(cfg, 1), cfg))
    assert {k: v.shape[1] for k, v in out.items()} == {o.name: o.width for o in cfg.outputs}
    del model, out
    gc.collect()
    w, h = REDUCED[cfg.backbone]
    _train_step(cfg.replace(width=w, height=h))
    gc.collect()


@pytest.mark.parametrize("name", [n for n in list_presets() if n not in BIG])
def test_cpu_preset_trains_at_its_own_resolution(name):
    cfg = get_config(name)
    assert cfg.width * cfg.height <= 160 * 90
    _train_step(cfg, batch_size=4)
    assert count_parameters(build_model(cfg)) < 5_000_000
