"""safetensors weights with identity, refusal of anything else, and transfer learning of parts."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from charles.model.inputs import example_batch, prepare_batch
from charles.model.net import build_model, torch_threads
from charles.model.presets import get_config
from charles.model.weights import (
    CONFIG_KEY,
    WeightsError,
    load_parts,
    load_weights,
    model_from_weights,
    read_weights,
    save_weights,
)


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    # the test machine is shared: spinning OpenMP threads cost 10x (see torch_threads)
    with torch_threads(1):
        yield


SMALL = dict(width=64, height=36)
MEMORY = dict(history="lstm", history_length=8, history_lstm_units=8, history_lstm_layers=2, use_purpose=True)


def tiny(seed: int = 0, **changes):
    cfg = get_config("tiny", **{**SMALL, **changes})
    torch.manual_seed(seed)
    return build_model(cfg).eval(), cfg


def predict(model, cfg, seed: int = 1) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(**prepare_batch(example_batch(cfg, 2, seed=seed), cfg))
    return {k: v.numpy() for k, v in out.items()}


def test_round_trip_in_bytes_and_half_precision():
    model, cfg = tiny()
    blob = save_weights(model, cfg, metadata={"batch": "1250"})
    fresh, _ = tiny(seed=5)
    w = load_weights(blob, cfg, into=fresh)
    assert w.config == cfg and w.metadata["batch"] == "1250"
    for k, v in predict(model, cfg).items():
        np.testing.assert_array_equal(predict(fresh, cfg)[k], v)
    half = save_weights(model, cfg, half=True)
    assert len(half) < 0.6 * len(blob)
    load_weights(half, cfg, into=fresh)
    for k, v in predict(model, cfg).items():
        np.testing.assert_allclose(predict(fresh, cfg)[k], v, atol=2e-2)
    assert next(fresh.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_saved_weights_predict_identically_in_a_fresh_process(tmp_path):
    model, cfg = tiny(**MEMORY)
    path = tmp_path / "tiny_memory.safetensors"
    assert save_weights(model, cfg, path) is None
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # written atomically
    expected = predict(model, cfg, seed=7)
    code = textwrap.dedent(f"""
        import json, torch
        from charles.model.inputs import example_batch, prepare_batch
        from charles.model.weights import model_from_weights
        model, w = model_from_weights({str(path)!r})
        model.eval()
        with torch.no_grad():
            out = model(**prepare_batch(example_batch(w.config, 2, seed=7), w.config))
        print(json.dumps({{k: v.tolist() for k, v in out.items()}}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    for k, v in expected.items():
        np.testing.assert_allclose(np.array(got[k], dtype=np.float32), v, rtol=1e-5, atol=1e-6)
    other, _ = tiny(seed=9, **MEMORY)
    assert not np.allclose(predict(other, cfg, seed=7)["steering"], expected["steering"])


class _Exploit:
    """Unpickling this creates a file: proof that a loader ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_and_torch_save_files_are_refused_without_running_them(tmp_path):
    model, cfg = tiny()
    marker = tmp_path / "pwned"
    legacy = pickle.dumps({"w": _Exploit(str(marker))}, protocol=2)
    zipped = tmp_path / "model.pt"
    torch.save(model.state_dict(), zipped)
    old = tmp_path / "old.pt"
    torch.save(model.state_dict(), old, _use_new_zipfile_serialization=False)
    for source in (legacy, zipped, old, zipped.read_bytes()):
        with pytest.raises(WeightsError, match="pickle") as e:
            load_weights(source, cfg, into=model)
        assert e.value.reason == "pickle" and isinstance(e.value, ValueError)
    assert not marker.exists()


def test_corrupt_data_is_refused_and_leaves_the_model_untouched():
    model, cfg = tiny()
    before = predict(model, cfg)
    good = save_weights(tiny(seed=3)[0], cfg)
    (n,) = struct.unpack("<Q", good[:8])
    corrupt = {
        "empty": b"",
        "random": os.urandom(4096),
        "truncated": good[: len(good) // 2],
        "header_length_lies": struct.pack("<Q", 10**12) + good[8:],
        "header_not_json": good[:8] + b"{" + b"[" * (n - 1) + good[8 + n :],
        "tensor_offsets_wrong": good.replace(b'"data_offsets":[0,', b'"data_offsets":[1,', 1),
    }
    for name, blob in corrupt.items():
        with pytest.raises(WeightsError) as e:
            load_weights(blob, cfg, into=model)
        assert e.value.reason in {"not_safetensors", "corrupt"}, name
    for k, v in before.items():
        np.testing.assert_array_equal(predict(model, cfg)[k], v)
    with pytest.raises(WeightsError, match="missing"):
        read_weights("/nonexistent/weights.safetensors")


def test_weights_of_another_model_or_without_identity_are_refused():
    model, cfg = tiny()
    other_model, other_cfg = tiny(**MEMORY)
    with pytest.raises(WeightsError, match="different model.*history") as e:
        load_weights(save_weights(other_model, other_cfg), cfg, into=model)
    assert e.value.reason == "config_mismatch"
    bare = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    with pytest.raises(WeightsError, match="does not say which model") as e:
        load_weights(bare, cfg)
    assert e.value.reason == "no_config"
    lying = safetensors.torch.save({"x": torch.zeros(1)}, metadata={CONFIG_KEY: json.dumps({"backbone": 5})})
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(lying, cfg)
    # a file claiming our config but holding other tensors is refused before anything is copied
    fake = safetensors.torch.save({"x": torch.zeros(1)}, metadata={CONFIG_KEY: cfg.to_json()})
    with pytest.raises(WeightsError, match="does not fit") as e:
        load_weights(fake, cfg, into=model)
    assert e.value.reason == "tensor_mismatch"
    # training-only fields may differ
    load_weights(save_weights(model, cfg.replace(dropout=0.2, freeze=("heads",))), cfg, into=model)


def test_non_finite_weights_are_refused():
    model, cfg = tiny()
    with torch.no_grad():
        model.heads["steering"].out.bias.fill_(float("nan"))
    with pytest.raises(WeightsError) as e:
        load_weights(save_weights(model, cfg), cfg)
    assert e.value.reason == "non_finite"


# --- transfer of parts -------------------------------------------------------------------------------


def test_load_parts_takes_the_cnn_from_one_run_and_the_lstm_from_another():
    """The seed's model_0009: CNN from a CNN-only model, LSTMs from a history-only model, the rest random."""
    cnn_only, cnn_cfg = tiny(seed=1)
    rnn_only, rnn_cfg = tiny(seed=2, backbone="", **MEMORY)
    combined, cfg = tiny(seed=3, **MEMORY)
    initial = {k: v.clone() for k, v in combined.state_dict().items()}
    report = load_parts(
        combined,
        {"backbone": save_weights(cnn_only, cnn_cfg), "history.lstm": save_weights(rnn_only, rnn_cfg)},
    )
    state = combined.state_dict()
    for k, v in state.items():
        if k.startswith("backbones."):
            assert torch.equal(v, cnn_only.state_dict()[k]), k
        elif k.startswith("history.lstm."):
            assert torch.equal(v, rnn_only.state_dict()[k]), k
        else:
            assert torch.equal(v, initial[k]), k
    assert [p.part for p in report.loaded] == ["backbones", "history.lstm"]
    assert report.loaded[1].tensors == 8  # 2 layers x (w_ih, w_hh, b_ih, b_hh)
    assert {"trunks", "heads"} <= set(report.untouched)
    text = str(report)
    assert "backbones <-" in text and "history.lstm <-" in text and "kept as initialised" in text
    assert report.unused == {}  # only keys under the prefixes read count, and every one of them was taken


def test_load_parts_is_strict_and_all_or_nothing():
    model, cfg = tiny(seed=3, **MEMORY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wider, wider_cfg = tiny(seed=4, **{**MEMORY, "history_lstm_units": 16})
    cnn, cnn_cfg = tiny(seed=1)
    with pytest.raises(WeightsError, match="history.lstm.*shape|is \\(") as e:
        load_parts(model, {"backbone": save_weights(cnn, cnn_cfg), "history": save_weights(wider, wider_cfg)})
    assert e.value.reason == "part_mismatch"
    with pytest.raises(WeightsError, match="missing"):
        load_parts(model, {"history": save_weights(cnn, cnn_cfg)})  # the CNN-only run has no history
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="no part 'decoder'"):
        load_parts(model, {"decoder": save_weights(cnn, cnn_cfg)})
    with pytest.raises(ValueError, match="overlap"):
        load_parts(model, {"history": save_weights(model, cfg), "history.lstm": save_weights(model, cfg)})


def test_imagenet_style_timm_file_loads_as_the_backbone_without_a_hub(tmp_path):
    torch.manual_seed(11)
    reference = timm.create_model(
        "regnetx_002", num_classes=1000
    )  # stands in for downloaded ImageNet weights
    path = tmp_path / "regnetx_002.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    cfg = get_config("tiny", **SMALL, pretrained=True)
    with pytest.raises(ValueError, match="pretrained_file"):
        build_model(cfg)
    model = build_model(cfg, pretrained_file=path)
    ref = reference.state_dict()
    for k, v in model.backbones[0].net.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # stacked frames: timm adapts the 3-channel first conv to 9 channels by itself
    stacked = build_model(cfg.replace(frames=3), pretrained_file=path)
    assert stacked.backbones[0].net.stem.conv.weight.shape[1] == 9
    # the same file through load_parts: a source prefix of "" reads the plain timm keys
    scratch, _ = tiny(seed=12)
    report = load_parts(scratch, {"backbones.0.net": (path, "")})
    assert torch.equal(scratch.backbones[0].net.stem.conv.weight, ref["stem.conv.weight"])
    assert set(report.unused[path.name]) == {"head.fc.weight", "head.fc.bias"}
    # and a model built from its own weights file needs no ImageNet file
    rebuilt, _ = model_from_weights(save_weights(model, cfg))
    assert torch.equal(rebuilt.backbones[0].net.stem.conv.weight, ref["stem.conv.weight"])
