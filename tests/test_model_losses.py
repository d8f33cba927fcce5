"""Targets, losses, metrics and decoding per output kind, table-tested against charles.outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charles.model.losses import bin_indices, compute_loss, compute_metrics, decode, encode_targets
from charles.outputs import OutputKind, OutputSpec, default_bins, parse_bins

DELTA_BINS = tuple(parse_bins([-0.3, -0.1, -0.03, 0.0, 0.03, 0.1, 0.3]))  # the seed's 0001 v4 delta bins


def spec(name: str, kind: str, bins=None) -> OutputSpec:
    return OutputSpec(name, OutputKind(kind), tuple(bins if bins is not None else default_bins(name, 3)))


BIN_SETS = {
    "v1_steering": default_bins("steering", 1),
    "v1_throttle_brake": default_bins("throttle_brake", 1),
    "v3_steering": default_bins("steering", 3),
    "v3_throttle_brake": default_bins("throttle_brake", 3),
    "v2_brake": default_bins("brake", 2),
    "delta": list(DELTA_BINS),
    "ranges_only": parse_bins([[-1.0, 0.0], [0.0, 1.0]]),
}
PROBES = [
    -1.5,
    -1.0,
    -0.99,
    -0.6,
    -0.3,
    -0.2,
    -0.1,
    -0.05,
    -0.03,
    0.0,
    1e-9,
    0.03,
    0.1,
    0.2,
    0.2000001,
    0.3,
    0.5,
    0.6,
    0.8,
    0.95,
    1.0,
    1.2,
    math.nan,
]


@pytest.mark.parametrize("bins", list(BIN_SETS.values()), ids=list(BIN_SETS))
def test_bin_indices_on_tensors_agree_with_the_balancers_bin_index(bins):
    s = OutputSpec("steering", OutputKind.CLASSIFICATION, tuple(bins))
    want = s.bin_index().indices(np.array(PROBES))
    np.testing.assert_array_equal(bin_indices(torch.tensor(PROBES, dtype=torch.float64), s).numpy(), want)
    # float32 labels (what a trainer's buffer holds) land in the same bins, edges included
    np.testing.assert_array_equal(bin_indices(torch.tensor(PROBES, dtype=torch.float32), s).numpy(), want)


def test_encode_targets_per_kind():
    reg, cls, dlt = (
        spec("steering", "regression"),
        spec("throttle_brake", "classification"),
        OutputSpec("throttle", OutputKind.DELTA, DELTA_BINS),
    )
    t = {
        "steering": torch.tensor([0.25, math.nan]),
        "throttle_brake": torch.tensor([1.0, 0.05]),
        "throttle": torch.tensor([0.5, 0.2]),
    }
    # float32 labels: 0.5f - 0.4f is 0.09999999; rounding puts it in the exact 0.1 bin
    enc = encode_targets(t, [reg, cls, dlt], previous={"throttle": torch.tensor([0.4, 0.5])})
    assert enc["steering"][0] == 0.25 and torch.isnan(enc["steering"][1])
    assert enc["throttle_brake"].tolist() == cls.bin_index().indices(np.array([1.0, 0.05])).tolist()
    # 0.5 - 0.4 = 0.1 (exact bin), 0.2 - 0.5 = -0.3 (exact bin)
    assert enc["throttle"].tolist() == [DELTA_BINS.index(parse_bins([0.1])[0]), 0]
    # ready-made class indices pass through
    assert encode_targets({"throttle_brake": torch.tensor([3, 4])}, [cls])["throttle_brake"].tolist() == [
        3,
        4,
    ]
    with pytest.raises(ValueError, match="needs previous"):
        encode_targets({"throttle": torch.tensor([0.5])}, [dlt])


def test_regression_loss_is_mse_and_skips_missing_labels():
    s = spec("steering", "regression")
    out = {"steering": torch.tensor([[0.5], [0.0], [9.0]], requires_grad=True)}
    total, per = compute_loss(out, {"steering": torch.tensor([0.0, 1.0, math.nan])}, [s])
    assert total.item() == pytest.approx((0.25 + 1.0) / 2)
    total.backward()
    assert out["steering"].grad[2, 0] == 0.0  # the missing label teaches nothing
    m = compute_metrics(out, {"steering": torch.tensor([0.0, 1.0, math.nan])}, [s])
    assert m["steering_mae"].item() == pytest.approx(0.75)


def test_classification_loss_is_cross_entropy_over_the_bins():
    s = spec("throttle_brake", "classification")
    logits = torch.randn(3, s.width)
    values = torch.tensor([1.0, -0.45, 5.0])  # the last is outside every bin: ignored
    idx = s.bin_index().indices(values.numpy())
    assert idx[2] == -1
    total, per = compute_loss({"throttle_brake": logits}, {"throttle_brake": values}, [s])
    want = F.cross_entropy(logits[:2], torch.tensor(idx[:2]))
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    logits2 = torch.full((2, s.width), -5.0)
    logits2[0, idx[0]] = 5.0  # right
    logits2[1, idx[0]] = 5.0  # wrong
    m = compute_metrics({"throttle_brake": logits2}, {"throttle_brake": values[:2]}, [s])
    assert m["throttle_brake_accuracy"].item() == pytest.approx(0.5)


def test_delta_loss_bins_the_change_from_previous():
    s = OutputSpec("steering", OutputKind.DELTA, DELTA_BINS)
    logits = torch.randn(2, s.width)
    total, _ = compute_loss(
        {"steering": logits},
        {"steering": torch.tensor([0.13, -0.2])},
        [s],
        previous={"steering": torch.tensor([0.1, 0.1])},
    )
    want_idx = s.bin_index().indices(np.array([0.03, -0.3]))  # the changes, as the balancer bins them
    assert (want_idx >= 0).all()
    assert total.item() == pytest.approx(F.cross_entropy(logits, torch.tensor(want_idx)).item(), rel=1e-6)


def test_all_labels_missing_gives_zero_not_nan():
    specs = [spec("steering", "regression"), spec("throttle_brake", "classification")]
    out = {"steering": torch.randn(2, 1), "throttle_brake": torch.randn(2, specs[1].width)}
    total, per = compute_loss(
        out, {"steering": torch.full((2,), math.nan), "throttle_brake": torch.full((2,), 7.0)}, specs
    )
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in per.values())


def test_loss_weights_and_per_output_values():
    specs = [spec("steering", "regression"), spec("throttle_brake", "regression")]
    out = {"steering": torch.ones(2, 1), "throttle_brake": torch.zeros(2, 1)}
    t = {"steering": torch.zeros(2), "throttle_brake": torch.ones(2)}
    total, per = compute_loss(out, t, specs, weights={"steering": 2.0})
    assert per == {"steering": pytest.approx(1.0), "throttle_brake": pytest.approx(1.0)}
    assert total.item() == pytest.approx(3.0)


def test_loss_in_float32_under_bf16_outputs():
    s = spec("steering", "classification")
    logits = torch.randn(4, s.width).to(torch.bfloat16)
    total, _ = compute_loss({"steering": logits}, {"steering": torch.tensor([0.0, 0.5, -0.5, 1.0])}, [s])
    assert total.dtype == torch.float32 and torch.isfinite(total)


DECODE_CASES = [
    # kind, raw row, previous, expected control
    ("regression", [0.3], 0.0, 0.3),
    ("regression", [1.7], 0.0, 1.0),
    ("regression", [math.nan], 0.0, 0.0),
    ("classification", "argmax:0", 0.0, 0.0),
    ("classification", "argmax:(0.2,0.3)", 0.0, 0.25),
    ("delta", "argmax:0.1", 0.5, 0.6),
    ("delta", "argmax:0.3", 0.9, 1.0),  # clipped to the signal's range
]


@pytest.mark.parametrize("kind, raw, previous, expected", DECODE_CASES)
def test_decode_table(kind, raw, previous, expected):
    s = OutputSpec("steering", OutputKind(kind), DELTA_BINS) if kind == "delta" else spec("steering", kind)
    if isinstance(raw, str):
        target = raw.split(":")[1]
        row = np.full(s.width, -3.0)
        row[[str(b) for b in s.bins].index(target)] = 3.0
        raw = row
    got = decode(
        {"steering": torch.tensor(np.array([raw]), dtype=torch.float32)}, [s], previous={"steering": previous}
    )
    assert got["steering"].shape == (1,)
    assert got["steering"][0] == pytest.approx(expected)
    assert got["steering"][0] == pytest.approx(s.decode(np.asarray(raw), previous))


def test_decode_batches_with_per_row_previous():
    s = OutputSpec("steering", OutputKind.DELTA, DELTA_BINS)
    logits = torch.zeros(2, s.width)
    logits[:, [str(b) for b in DELTA_BINS].index("0.1")] = 1.0
    got = decode({"steering": logits}, [s], previous={"steering": np.array([0.0, -0.5])})
    np.testing.assert_allclose(got["steering"], [0.1, -0.4])
