"""ModelConfig as plain data: round trips, validation, identity, presets (no network is built here)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from charles.model.config import HISTORY_FIELDS, ModelConfig, field_help
from charles.model.presets import get_config, list_presets
from charles.outputs import OutputKind, default_outputs

SEED_LINES = [
    "model_0001_xception",
    "model_0002_xception",
    "model_0003_xception",
    "model_0004_inceptionresnetv2",
    "model_0005_inceptionresnetv2",
    "model_0006_inceptionresnetv2",
    "model_0007_inceptionresnetv2",
    "model_0008_irv2_data_td",
    "model_0009_irv2_cr_tl",
    "model_0010_irv2_tcb",
    "model_0011_x_tcb",
    "model_0012_regnet",
]


def test_every_seed_line_and_a_cpu_preset_is_registered():
    names = list_presets()
    assert set(SEED_LINES) <= set(names)
    assert "tiny" in names


@pytest.mark.parametrize("name", list_presets())
def test_preset_round_trips_through_a_plain_dict_and_json(name):
    cfg = get_config(name)
    assert cfg.name == name
    d = cfg.to_dict()
    # plain data only: what msgpack and JSON carry
    assert json.loads(json.dumps(d)) == d
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_every_field_has_a_one_line_help():
    helps = field_help()
    assert set(helps) == {f.name for f in dataclasses.fields(ModelConfig)}
    for name, text in helps.items():
        assert text and "\n" not in text, name


def test_lists_and_tuples_build_equal_configs():
    a = ModelConfig(common_widths=(512, 256), history_fields=("steering", "speed"))
    b = ModelConfig(
        common_widths=[512, 256],
        history_fields=["steering", "speed"],
        outputs=[o.to_dict() for o in default_outputs(3)],
    )
    assert a == b and hash(a) == hash(b)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"history": "gru"}, "history must be one of"),
        ({"history_output": "state"}, "history_output"),
        ({"frames": 0}, "frames"),
        ({"width": 4}, "width"),
        ({"history_fields": ("steering", "yaw")}, "history_fields"),
        ({"dropout": 1.0}, "dropout"),
        ({"common_widths": (0,)}, "width"),
        ({"outputs": ()}, "at least one output"),
        ({"backbone": "", "history": "none"}, "without a backbone"),
        ({"frames": "3"}, "integer"),
        ({"use_purpose": 1}, "true or false"),
        ({"history_fields": "steering"}, "list"),
        ({"common_widths": (512.5,)}, "list of int"),
        ({"freeze": (1,)}, "list of str"),
    ],
)
def test_invalid_configs_are_refused_with_a_clear_message(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**change)


def test_from_dict_refuses_unknown_keys_and_garbage():
    d = ModelConfig().to_dict()
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**d, "backbon": "resnet18"})
    with pytest.raises(ValueError, match="mapping"):
        ModelConfig.from_dict(["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="JSON"):
        ModelConfig.from_json("{not json")
    with pytest.raises(ValueError, match="malformed|bins|unknown output"):
        ModelConfig.from_dict({**d, "outputs": [{"name": "yaw", "bins": [0.0]}]})


def test_identity_ignores_how_a_model_is_initialised_or_trained():
    cfg = get_config("model_0009_irv2_cr_tl")
    trained = cfg.replace(
        freeze=("backbones",), dropout=0.3, pretrained=True, transfer=(), convcam_layer="repeat_2"
    )
    assert trained != cfg
    assert trained.same_weights(cfg) and not trained.differences(cfg)
    other = cfg.replace(history_lstm_units=64)
    assert other.differences(cfg) == {"history_lstm_units": (64, 128)}


def test_get_config_accepts_a_run_name_and_overrides():
    cfg = get_config("model_0004_inceptionresnetv2_v3", width=240, height=135)
    assert cfg.name == "model_0004_inceptionresnetv2" and (cfg.width, cfg.height) == (240, 135)
    with pytest.raises(KeyError, match="unknown model preset"):
        get_config("model_9999_nothing")
    with pytest.raises(ValueError, match="unknown model config fields"):
        get_config("tiny", resolution=(1, 2))


def test_presets_follow_the_seed_lines():
    assert get_config("model_0001_xception").output_names == ("steering", "throttle", "brake")
    assert get_config("model_0003_xception").output_names == ("steering", "throttle_brake")
    assert get_config("model_0005_inceptionresnetv2").pretrained
    assert get_config("model_0006_inceptionresnetv2").frames == 7
    assert get_config("model_0007_inceptionresnetv2").history == "mlp"
    assert get_config("model_0008_irv2_data_td").history == "td_lstm"
    c9 = get_config("model_0009_irv2_cr_tl")
    assert (c9.history, c9.history_lstm_layers, c9.transfer) == ("lstm", 5, ("backbones", "history.lstm"))
    assert get_config("model_0010_irv2_tcb").backbone_per_output
    assert get_config("model_0011_x_tcb").backbone == "legacy_xception"
    assert get_config("model_0012_regnet").backbone.startswith("regnet")
    assert all(o.kind is OutputKind.REGRESSION for o in get_config("tiny").outputs)


def test_history_fields_agree_with_the_wire_contract():
    from charles.proto.messages import HISTORY_FIELDS as WIRE

    assert HISTORY_FIELDS == WIRE


def test_config_module_does_not_import_torch():
    # collectors and the balancer read the model config; they must not pay for torch
    code = (
        "import sys; import charles.model.config, charles.model.presets; "
        "from charles.model import ModelConfig, get_config; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
