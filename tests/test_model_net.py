"""CharlesNet on the tiny preset: every input mode, prepare_batch, training per output kind, freezing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from charles.model.config import ModelConfig
from charles.model.inputs import example_batch, image_stats, prepare_batch
from charles.model.losses import compute_loss
from charles.model.net import build_model, count_parameters, optimize_for_device, torch_threads
from charles.model.presets import get_config
from charles.outputs import OutputKind, OutputSpec, default_outputs, parse_bins

SMALL = dict(width=64, height=36)


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    # the test machine is shared: spinning OpenMP threads cost 10x (see torch_threads)
    with torch_threads(1):
        yield


def tiny(**changes) -> ModelConfig:
    return get_config("tiny", **{**SMALL, **changes})


def forward_backward(cfg: ModelConfig, batch_size: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(cfg).train()
    out = model(**prepare_batch(example_batch(cfg, batch_size), cfg))
    assert set(out) == set(cfg.output_names)
    for spec in cfg.outputs:
        assert out[spec.name].shape == (batch_size, spec.width)
    targets = {n: torch.zeros(batch_size) for n in cfg.output_names}
    loss, _ = compute_loss(out, targets, cfg.outputs, previous=targets)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return out


HISTORY_VARIANTS = {
    "mlp": dict(history="mlp", history_length=10, history_widths=(32, 16)),
    "td_lstm": dict(history="td_lstm", history_length=10, history_widths=(16,), history_lstm_units=8),
    "lstm_prediction": dict(history="lstm", history_length=10, history_lstm_units=8, history_lstm_layers=2),
    "lstm_thought": dict(
        history="lstm", history_length=10, history_lstm_units=8, history_output="thought", history_post=(8, 8)
    ),
    "fields_subset": dict(
        history="lstm", history_length=5, history_fields=("steering", "speed"), history_lstm_units=4
    ),
    "scalars": dict(use_speed=True, use_purpose=True, use_previous=True),
    "stacked_frames": dict(frames=3),
    "two_backbones": dict(backbone_per_output=True),
    "three_outputs": dict(
        outputs=tuple(default_outputs(1)) + (OutputSpec("brake", bins=tuple(parse_bins([0.0, [0.0, 1.0]]))),)
    ),
    "history_only": dict(
        backbone="", history="lstm", history_length=10, history_lstm_units=8, use_purpose=True
    ),
    "no_common_layers": dict(common_widths=(), head_layers=1),
    "classification_and_delta": dict(
        outputs=(
            OutputSpec("steering", OutputKind.CLASSIFICATION, tuple(default_outputs(3)[0].bins)),
            OutputSpec("throttle_brake", OutputKind.DELTA, tuple(parse_bins([-0.1, 0.0, 0.1]))),
        )
    ),
}


@pytest.mark.parametrize("variant", list(HISTORY_VARIANTS))
def test_every_input_mode_does_a_forward_and_backward_pass(variant):
    forward_backward(tiny(**HISTORY_VARIANTS[variant]))


def test_thought_vector_is_hidden_and_cell_state():
    pred = build_model(tiny(**HISTORY_VARIANTS["lstm_prediction"]))
    thought = build_model(tiny(**HISTORY_VARIANTS["lstm_prediction"], history_output="thought"))
    assert pred.history.out_features == 8 and thought.history.out_features == 16


def test_two_backbones_feed_one_output_each():
    cfg = tiny(backbone_per_output=True)
    model = build_model(cfg).eval()
    inputs = prepare_batch(example_batch(cfg, 2), cfg)
    with torch.no_grad():
        before = model(**inputs)
        model.backbones[1].net.stem.conv.weight.mul_(3.0)
        after = model(**inputs)
    assert torch.equal(before["steering"], after["steering"])
    assert not torch.equal(before["throttle_brake"], after["throttle_brake"])


def test_seed_head_rule_and_the_classification_floor():
    model = build_model(get_config("tiny", common_widths=(1024,)))
    widths = [m.out_features for m in model.heads["steering"].dense if isinstance(m, torch.nn.Linear)]
    assert widths == [256, 64, 16]  # each 4x narrower, as the seed built them
    cls = build_model(get_config("tiny", outputs=tuple(default_outputs(3, {"steering": "classification"}))))
    widths = [m.out_features for m in cls.heads["steering"].dense if isinstance(m, torch.nn.Linear)]
    assert widths == [64, 21, 21] and cls.heads["steering"].out.out_features == 21


# --- prepare_batch ----------------------------------------------------------------------------------------


def test_prepare_batch_normalises_on_the_device_into_channels_last():
    cfg = tiny()
    batch = example_batch(cfg, 2)
    batch["frame"][:] = 255
    image = prepare_batch(batch, cfg)["image"]
    mean, std = image_stats(cfg.backbone)
    assert image.dtype == torch.float32 and image.shape == (2, 3, 36, 64)
    assert image.is_contiguous(memory_format=torch.channels_last)  # NHWC uint8 becomes an NCHW view for free
    for c in range(3):
        assert image[:, c].flatten().unique().tolist() == pytest.approx([(1.0 - mean[c]) / std[c]], rel=1e-5)


def test_stacked_frames_are_packed_oldest_first_current_last():
    cfg = tiny(frames=3, backbone="legacy_xception")  # mean = std = 0.5: value v maps to v/127.5 - 1
    batch = example_batch(cfg, 1)
    batch["stack"][0, 0], batch["stack"][0, 1], batch["frame"][0] = 0, 51, 255
    image = prepare_batch(batch, cfg)["image"]
    per_frame = [image[0, 3 * k : 3 * k + 3].mean().item() for k in range(3)]
    assert per_frame == pytest.approx([-1.0, 51 / 127.5 - 1, 1.0], abs=1e-4)


def test_frames_of_another_size_are_resized_on_the_device():
    cfg = tiny(frames=2)
    batch = example_batch(cfg.replace(width=128, height=72), 2)
    image = prepare_batch(batch, cfg)["image"]
    assert image.shape == (2, 6, 36, 64)
    # the uint8 resize (CPU) agrees with a float resize to within uint8 rounding
    frames = torch.cat([torch.from_numpy(batch["stack"]), torch.from_numpy(batch["frame"])[:, None]], 1)
    flat = frames.permute(0, 1, 4, 2, 3).flatten(1, 2).float()
    ref = torch.nn.functional.interpolate(flat, size=(36, 64), mode="bilinear", antialias=True)
    mean, std = image_stats(cfg.backbone)
    ref = (ref / 255 - torch.tensor(mean * 2).view(1, -1, 1, 1)) / torch.tensor(std * 2).view(1, -1, 1, 1)
    torch.testing.assert_close(image, ref, atol=1.01 / 255 / min(std), rtol=0)


def test_history_and_scalars_are_scaled_and_trimmed_to_the_newest_rows():
    cfg = tiny(history="lstm", history_length=3, use_speed=True, use_purpose=True, use_previous=True)
    hist = np.zeros((1, 5, 5), np.float32)
    hist[0, :, 0] = [0.1, 0.2, 0.3, 0.4, 0.5]  # steering, oldest first
    hist[0, -1, 2:] = [cfg.speed_scale, math.pi, cfg.distance_scale]
    batch = {
        **example_batch(cfg, 1),
        "history": hist,
        "speed": np.array([15.0]),
        "purpose": np.array([[-math.pi / 2, 0.0]]),
        "previous": np.array([[0.25, -1.0]]),
    }
    out = prepare_batch(batch, cfg)
    assert out["history"].shape == (1, 3, 5)
    assert out["history"][0, :, 0].tolist() == pytest.approx([0.3, 0.4, 0.5])
    assert out["history"][0, -1, 2:].tolist() == pytest.approx([1.0, 1.0, math.log(2.0)])
    assert out["scalars"][0].tolist() == pytest.approx([0.5, -0.5, 0.0, 0.25, -1.0])
    hist[0, 0, 2] = np.nan  # a broken row must not poison the batch
    assert torch.isfinite(prepare_batch({**batch, "history": hist}, cfg)["history"]).all()


@pytest.mark.parametrize(
    "cfg_changes, batch_changes, message",
    [
        ({}, {"frame": None}, "missing"),
        ({}, {"frame": np.zeros((1, 36, 64, 3), np.float32)}, "uint8"),
        ({"frames": 3}, {"stack": np.zeros((1, 1, 36, 64, 3), np.uint8)}, "stacks 3 frames"),
        (
            {"history": "mlp", "history_length": 10},
            {"history": np.zeros((1, 5, 5), np.float32)},
            "reads 10 history rows",
        ),
        ({"history": "mlp"}, {"history": np.zeros((1, 60, 4), np.float32)}, r"\[B, T, 5\]"),
    ],
)
def test_prepare_batch_refuses_malformed_batches(cfg_changes, batch_changes, message):
    cfg = tiny(**cfg_changes)
    batch = example_batch(cfg, 1)
    for k, v in batch_changes.items():
        if v is None:
            del batch[k]
        else:
            batch[k] = v
    with pytest.raises(ValueError, match=message):
        prepare_batch(batch, cfg)


def test_forward_works_under_bf16_autocast_and_channels_last():
    cfg = tiny(
        history="lstm", history_length=10, history_lstm_units=8, history_output="thought", use_speed=True
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = prepare_batch(example_batch(cfg, 2), cfg)
    with torch.no_grad():
        ref = model(**inputs)
        fast = optimize_for_device(model, "cpu", channels_last=True)
        assert fast.backbones[0].net.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
        cl = fast(**inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = fast(**prepare_batch(example_batch(cfg, 2), cfg, dtype=torch.bfloat16))
    for name in cfg.output_names:
        torch.testing.assert_close(cl[name], ref[name], rtol=1e-4, atol=1e-4)
        assert torch.isfinite(bf[name].float()).all()
        torch.testing.assert_close(bf[name].float(), ref[name], rtol=0.1, atol=0.1)


# --- freezing ---------------------------------------------------------------------------------------------


def test_frozen_parts_neither_learn_nor_update_batch_norm_statistics():
    cfg = tiny(freeze=("backbone",))  # alias of "backbones"
    model = build_model(cfg).train()
    assert not model.backbones[0].training and model.heads.training
    frozen_before = {k: v.clone() for k, v in model.backbones.state_dict().items()}
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(**prepare_batch(example_batch(cfg, 4), cfg))
    loss, _ = compute_loss(out, {n: torch.ones(4) for n in cfg.output_names}, cfg.outputs)
    loss.backward()
    opt.step()
    assert all(torch.equal(v, model.backbones.state_dict()[k]) for k, v in frozen_before.items())
    assert not all(torch.equal(v, model.heads.state_dict()[k]) for k, v in heads_before.items())
    assert count_parameters(model, trainable_only=True) == count_parameters(model.trunks) + count_parameters(
        model.heads
    )
    with pytest.raises(ValueError, match="no part"):
        build_model(tiny(freeze=("cnn_layers",)))


# --- learning per output kind ----------------------------------------------------------------------------

DELTA_BINS = tuple(parse_bins([-0.3, -0.1, -0.03, 0.0, 0.03, 0.1, 0.3]))


def synthetic(cfg: ModelConfig, kind: str, n: int, rng: np.random.Generator):
    """Frames whose red and green channel brightness encode the two targets (or their change, for delta)."""
    prev = np.zeros((n, 2))
    if kind == "regression":
        values = rng.uniform(-1, 1, (n, 2))
        code = values
    elif kind == "classification":
        values = rng.choice([-0.85, -0.45, 0.0, 0.45, 0.85], (n, 2))  # five well-separated classes
        code = values
    else:
        change = rng.choice([-0.3, -0.1, 0.0, 0.1, 0.3], (n, 2))
        prev = rng.uniform(-0.5, 0.5, (n, 2))
        values, code = prev + change, change / 0.3
    frames = rng.integers(100, 156, (n, cfg.height, cfg.width, 3)).astype(np.float64)
    frames[..., 0] = 127 + 120 * code[:, 0, None, None]
    frames[..., 1] = 127 + 120 * code[:, 1, None, None]
    batch = {"frame": frames.astype(np.uint8), "previous": prev.astype(np.float32)}
    names = cfg.output_names
    return (
        batch,
        {k: torch.tensor(values[:, i]) for i, k in enumerate(names)},
        {k: torch.tensor(prev[:, i]) for i, k in enumerate(names)},
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["regression", "classification", "delta"])
def test_each_output_kind_learns_a_synthetic_task(kind):
    if kind == "delta":
        outputs = tuple(OutputSpec(n, OutputKind.DELTA, DELTA_BINS) for n in ("steering", "throttle_brake"))
    else:
        outputs = tuple(default_outputs(3, {"steering": kind, "throttle_brake": kind}))
    cfg = get_config("tiny", width=64, height=36, outputs=outputs, use_previous=kind == "delta")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch, targets, previous = synthetic(cfg, kind, 64, rng)
    losses = []
    for _ in range(30):
        idx = rng.choice(64, 16, replace=False)
        out = model(**prepare_batch({k: v[idx] for k, v in batch.items()}, cfg))
        loss, per = compute_loss(
            out,
            {k: v[idx] for k, v in targets.items()},
            cfg.outputs,
            previous={k: v[idx] for k, v in previous.items()},
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, f"{kind}: loss {first:.3f} -> {last:.3f}"


def test_the_package_exports_resolve():
    import charles.model

    assert all(getattr(charles.model, name) is not None for name in charles.model.__all__)


def test_an_unknown_timm_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="timm has no model 'resnet_nope'"):
        build_model(tiny(backbone="resnet_nope"))
