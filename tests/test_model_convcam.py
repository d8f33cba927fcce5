"""Convcam images for one and two backbones, and the player's Predictor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from charles.model.convcam import ActivationTap, convcam_image, convcam_layers, feature_maps
from charles.model.inputs import example_batch, prepare_batch
from charles.model.losses import decode
from charles.model.net import build_model, torch_threads
from charles.model.predictor import Predictor
from charles.model.presets import get_config
from charles.model.weights import WeightsError, read_weights, save_weights


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    # the test machine is shared: spinning OpenMP threads cost 10x (see torch_threads)
    with torch_threads(1):
        yield


SMALL = dict(width=96, height=54)


def built(seed: int = 0, **changes):
    cfg = get_config("tiny", **{**SMALL, **changes})
    torch.manual_seed(seed)
    return build_model(cfg).eval(), cfg


def test_tiles_are_laid_out_side_by_side():
    maps = torch.arange(6 * 2 * 3, dtype=torch.float32).reshape(6, 2, 3)  # 6 kernels of 2x3
    img = convcam_image(maps, aspect=1.0)
    assert img.shape == (3 * 2, 2 * 3, 3) and img.dtype == np.uint8  # 2 columns x 3 rows: a square image
    assert (img[..., 0] == img[..., 1]).all()  # one backbone: grey
    grey = img[..., 0].astype(int)
    # tile k sits at row k // 2, column k % 2 and keeps its own pixels in order
    assert grey[0, 0] == 0 and grey[-1, -1] == 255
    assert grey[0, 3] > grey[0, 2] and grey[2, 0] > grey[1, 5]  # tile 1 right of tile 0, tile 2 below them


def test_convcam_of_the_last_feature_map_for_one_backbone():
    model, cfg = built()
    maps = feature_maps(model, prepare_batch(example_batch(cfg, 1), cfg))
    assert len(maps) == 1
    c, h, w = maps[0].shape[1:]
    assert c == model.backbones[0].net.num_features  # the map that the global pool averages
    img = convcam_image(maps)
    cols = max(1, round(math.sqrt(c * 16 / 9 * h / w)))
    assert img.shape == (math.ceil(c / cols) * h, cols * w, 3)
    assert convcam_image(maps, scale=3).shape == (img.shape[0] * 3, img.shape[1] * 3, 3)


def test_convcam_of_a_named_layer():
    model, cfg = built()
    layers = convcam_layers(model)
    assert "s2" in layers and "head" not in layers
    early = feature_maps(model, prepare_batch(example_batch(cfg, 1), cfg), layer="s2")[0]
    late = feature_maps(model, prepare_batch(example_batch(cfg, 1), cfg))[0]
    assert early.shape[2] > late.shape[2]  # earlier layers: fewer, bigger tiles
    with pytest.raises(ValueError, match="no layer"):
        ActivationTap(model, "conv_7b_ac")


def test_two_backbones_share_one_grid_in_two_colours():
    model, cfg = built(backbone_per_output=True)
    maps = feature_maps(model, prepare_batch(example_batch(cfg, 1), cfg))
    assert len(maps) == 2
    one = convcam_image(maps[0])
    two = convcam_image(maps)
    assert two.shape == one.shape
    r, g, b = (two[..., i].astype(int) for i in range(3))
    assert (r != b).any()  # coloured, not grey
    assert convcam_image(maps, colors=[(255, 0, 0), (0, 0, 255)])[..., 1].max() == 0


def test_predictor_matches_the_batch_path_and_decodes():
    cfg = get_config(
        "tiny",
        **SMALL,
        history="lstm",
        history_length=6,
        history_lstm_units=8,
        use_speed=True,
        use_purpose=True,
        frames=2,
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = example_batch(cfg, 1, seed=3)
    with torch.no_grad():
        ref = model(**prepare_batch(batch, cfg))
    p = Predictor(model, convcam=True)
    assert p.convcam() is None
    raw = p.predict(
        batch["frame"][0],
        speed=float(batch["speed"][0]),
        purpose=batch["purpose"][0],
        history=batch["history"][0],
        stack=batch["stack"][0],
    )
    for k, v in ref.items():
        np.testing.assert_allclose(raw[k], v[0].numpy(), rtol=1e-5, atol=1e-6)
    controls = p.controls(raw)
    assert controls == {k: pytest.approx(v[0]) for k, v in decode(ref, cfg.outputs).items()}
    assert all(-1.0 <= v <= 1.0 for v in controls.values())
    img = p.convcam()
    assert img is not None and img.dtype == np.uint8 and img.ndim == 3
    with pytest.raises(ValueError, match="stacks 2 frames"):
        p.predict(batch["frame"][0], history=batch["history"][0])


def test_predictor_swaps_weights_and_refuses_foreign_ones():
    model, cfg = built(seed=0)
    p = Predictor(model)
    frame = example_batch(cfg, 1)["frame"][0]
    before = p.predict(frame)
    other, other_cfg = built(seed=1, use_speed=True)
    with pytest.raises(WeightsError):
        p.swap_weights(save_weights(other, other_cfg))
    after = p.predict(frame)
    assert all(np.array_equal(after[k], before[k]) for k in before)  # still driving on the old weights
    newer, _ = built(seed=2)
    p.swap_weights(save_weights(newer, cfg))
    with torch.no_grad():
        want = newer(**prepare_batch({"frame": frame[None]}, cfg))
    np.testing.assert_allclose(
        p.predict(frame)["steering"], want["steering"][0].numpy(), rtol=1e-5, atol=1e-6
    )
    p2 = Predictor.from_weights(save_weights(newer, cfg), cfg)
    np.testing.assert_allclose(
        p2.predict(frame)["steering"], want["steering"][0].numpy(), rtol=1e-5, atol=1e-6
    )


def test_compiled_models_predict_the_same_and_save_plain_keys():
    model, cfg = built(seed=0)
    frame = example_batch(cfg, 1)["frame"][0]
    plain = Predictor(model).predict(frame)
    p = Predictor(model, compile="eager")  # the wrapper without inductor's minutes of compiling
    assert type(p.model).__name__ == "OptimizedModule"
    np.testing.assert_allclose(p.predict(frame)["steering"], plain["steering"], rtol=1e-6)
    blob = save_weights(p.model)
    assert set(read_weights(blob).state_dict) == set(model.state_dict())  # no "_orig_mod." prefixes
    newer, _ = built(seed=2)
    p.swap_weights(save_weights(newer, cfg))
    assert not np.allclose(p.predict(frame)["steering"], plain["steering"])


# --- batch norm folded into the convolutions (the player's inference network) ------------------------------


def _random_norm_stats(model: torch.nn.Module, seed: int = 3) -> None:
    """Trained-looking norms: fresh ones (mean 0, var 1) would make a wrong fold look right."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)


def test_folding_batch_norm_keeps_the_outputs_and_leaves_no_norm():
    import copy

    from charles.model.net import fold_batchnorm

    model, cfg = built(seed=0, use_speed=True)
    _random_norm_stats(model)
    folded = copy.deepcopy(model)
    n = fold_batchnorm(folded)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert n == norms > 10
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    inputs = prepare_batch(example_batch(cfg, 3), cfg)
    with torch.inference_mode():
        want, got = model(**inputs), folded(**inputs)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_the_predictor_drives_the_folded_net_and_refolds_on_every_swap():
    model, cfg = built(seed=0)
    _random_norm_stats(model)
    p = Predictor(model, convcam=True)
    assert p.fold_bn and p.net is not p.model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in p.net.modules())
    frame = example_batch(cfg, 1, seed=5)["frame"][0]
    with torch.inference_mode():
        want = model(**prepare_batch({"frame": frame[None]}, cfg))
    np.testing.assert_allclose(
        p.predict(frame)["steering"], want["steering"][0].numpy(), rtol=1e-4, atol=1e-5
    )
    # new weights (other norm statistics too) are folded again; the convcam follows the new net
    newer, _ = built(seed=2)
    _random_norm_stats(newer, seed=9)
    p.swap_weights(save_weights(newer, cfg))
    with torch.inference_mode():
        want = newer(**prepare_batch({"frame": frame[None]}, cfg))
    np.testing.assert_allclose(
        p.predict(frame)["steering"], want["steering"][0].numpy(), rtol=1e-4, atol=1e-5
    )
    assert p.convcam() is not None
    assert set(read_weights(save_weights(p.model)).state_dict) == set(newer.state_dict())  # layout kept


class _PreActivation(torch.nn.Module):
    """A net whose names say conv then bn while its forward runs the bn first (pre-activation style)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.cfg = inner.cfg.replace(name="tiny_preact_probe")  # another structure: checked on its own
        self.inner = inner
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, image, **rest):
        return self.inner(image=self.conv(self.bn(image)), **rest)


def test_a_net_whose_norms_run_before_their_convs_is_not_folded():
    inner, cfg = built(seed=0)
    model = _PreActivation(inner).eval()
    _random_norm_stats(model)
    p = Predictor(model)
    assert not p.fold_bn and p.net is p.model
    frame = example_batch(cfg, 1, seed=5)["frame"][0]
    with torch.inference_mode():
        want = model(**prepare_batch({"frame": frame[None]}, cfg))
    np.testing.assert_allclose(
        p.predict(frame)["steering"], want["steering"][0].numpy(), rtol=1e-5, atol=1e-6
    )
