"""The seed's model lines as named presets, plus small CPU presets.

Each preset is a small registered function returning a ``ModelConfig`` (timm's habit: the entry point is
named after the model). A *line* is a preset; a *run* is a version of a line (``model_0004_inceptionresnetv2_v3``)
and ``get_config`` accepts either.

Where the seed's pages give parameter counts, the presets reproduce the seed's structure exactly: a
pooled backbone, a common dense layer of 1024, and per output three dense layers of 256, 64 and 16 before a
one-unit regression layer. That reproduces the Keras totals of model_0003 (23,519,466 = Xception 20,861,480
+ 2,657,986) and model_0004 (56,470,434 = IRv2 54,336,736 + 2,133,698) to the parameter, the stacked 21-channel
first convolution of model_0006 (+5,184) and the dual-backbone totals of 0010/0011. timm's backbones differ
from Keras' by a few ten-thousand parameters (batch-norm and bias conventions). Widths the seed's pages do not
give (the history MLP of 0001/0007, the time-distributed layers of 0008) are our choice and say so.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from charles.model.config import ModelConfig, regression_outputs
from charles.outputs import default_outputs

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_preset(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    """Register a preset under its function's name (which must also be the config's ``name``)."""
    if fn.__name__ in _PRESETS:
        raise ValueError(f"preset {fn.__name__!r} is registered twice")
    _PRESETS[fn.__name__] = fn
    return fn


def list_presets() -> list[str]:
    return list(_PRESETS)


def describe_preset(name: str) -> str:
    """The first sentence of a preset's docstring (for listings)."""
    doc = " ".join((_PRESETS[name].__doc__ or "").split())
    return doc.split(". ")[0].rstrip(".") + "."


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset for a line or a run of it (``..._v3`` is stripped), with any fields overridden."""
    key = name if name in _PRESETS else re.sub(r"_v\d+$", "", name)
    if key not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; presets: {', '.join(_PRESETS)}")
    cfg = _PRESETS[key]()
    return cfg.replace(**overrides) if overrides else cfg


# The seed's shared structure (model_0001_xception_v6 onwards): pooled CNN features, one common dense layer
# of 1024, heads of 1024/4, /16, /64 units, then the output layer.
_SEED = dict(width=480, height=270, common_widths=(1024,), head_layers=3, head_divisor=4, activation="relu")
# The recurrent lines' history: all five columns (purpose widened to 60 rows in 0008), 5 LSTMs of 128 units.
# 128 x 5 matches the seed's RNN-only model_0008_v5 to the parameter (606,162 with its small dense layers).
_LSTM5 = dict(history_length=60, history_lstm_units=128, history_lstm_layers=5)


# --- Xception lines ------------------------------------------------------------------------------------


@register_preset
def model_0001_xception() -> ModelConfig:
    """v6 of the first line: Xception, 3 regression outputs (steering, throttle, brake), Balancing v1 bins."""
    return ModelConfig(
        name="model_0001_xception",
        backbone="legacy_xception",
        outputs=regression_outputs(("steering", "throttle", "brake"), version=1),
        **_SEED,
    )


@register_preset
def model_0002_xception() -> ModelConfig:
    """Same network as 0001 v6 on Balancing v2 (each output balanced alone: labels of the others are NaN).

    The seed needed a custom Keras model with one helper model per output for that; here compute_loss
    simply masks missing labels, so the same network trains on per-output balanced sets.
    """
    return model_0001_xception().replace(
        name="model_0002_xception", outputs=regression_outputs(("steering", "throttle", "brake"), version=2)
    )


@register_preset
def model_0003_xception() -> ModelConfig:
    """Back to a standard model: 2 outputs (steering, combined throttle/brake), Balancing v3 bins."""
    return ModelConfig(
        name="model_0003_xception", backbone="legacy_xception", outputs=tuple(default_outputs(3)), **_SEED
    )


# --- InceptionResNetV2 lines ---------------------------------------------------------------------------


@register_preset
def model_0004_inceptionresnetv2() -> ModelConfig:
    """0003's structure on InceptionResNetV2: the seed's best model (v3, 752,000 batches)."""
    return ModelConfig(
        name="model_0004_inceptionresnetv2",
        backbone="inception_resnet_v2",
        outputs=tuple(default_outputs(3)),
        **_SEED,
    )


@register_preset
def model_0005_inceptionresnetv2() -> ModelConfig:
    """0004 started from ImageNet weights (nothing frozen)."""
    return model_0004_inceptionresnetv2().replace(name="model_0005_inceptionresnetv2", pretrained=True)


@register_preset
def model_0006_inceptionresnetv2() -> ModelConfig:
    """0004 with the current frame and 6 past ones channel-stacked into a 21-channel input (v1)."""
    return model_0004_inceptionresnetv2().replace(name="model_0006_inceptionresnetv2", frames=7)


@register_preset
def model_0007_inceptionresnetv2() -> ModelConfig:
    """History back in: 60 rows of steering, throttle/brake and speed flattened through 5 dense layers,
    the purpose beside it, and 3 common dense layers. The dense widths of the history MLP are ours."""
    return model_0004_inceptionresnetv2().replace(
        name="model_0007_inceptionresnetv2",
        history="mlp",
        history_fields=("steering", "throttle_brake", "speed"),
        history_widths=(256,) * 5,
        use_purpose=True,
        common_widths=(1024,) * 3,
    )


@register_preset
def model_0008_irv2_data_td() -> ModelConfig:
    """v1: all five history columns through 5 time-distributed dense layers and one LSTM (its prediction),
    joined to the IRv2 features, 3 common dense layers. The time-distributed widths are ours."""
    return model_0004_inceptionresnetv2().replace(
        name="model_0008_irv2_data_td",
        history="td_lstm",
        history_widths=(128,) * 5,
        history_length=60,
        history_lstm_units=128,
        history_lstm_layers=1,
        history_output="prediction",
        common_widths=(1024,) * 3,
    )


@register_preset
def model_0009_irv2_cr_tl() -> ModelConfig:
    """v1 (= 0008 v3): 5 stacked LSTMs then 3 dense layers of 128, joined to IRv2, 3 common dense layers.
    Transfer learning: the CNN from a CNN-only run (0004 v3) and the LSTMs from an RNN-only run (0008 v5),
    everything else random; nothing frozen (v3-v5 froze the CNN: ``freeze=("backbones",)``)."""
    return model_0004_inceptionresnetv2().replace(
        name="model_0009_irv2_cr_tl",
        history="lstm",
        history_output="prediction",
        history_post=(128,) * 3,
        common_widths=(1024,) * 3,
        transfer=("backbones", "history.lstm"),
        **_LSTM5,
    )


@register_preset
def model_0010_irv2_tcb() -> ModelConfig:
    """Two CNN backbones: 0004's structure once per output (112M parameters, never trained by the seed)."""
    return model_0004_inceptionresnetv2().replace(name="model_0010_irv2_tcb", backbone_per_output=True)


@register_preset
def model_0011_x_tcb() -> ModelConfig:
    """Two Xception backbones: 0003's structure once per output."""
    return model_0003_xception().replace(name="model_0011_x_tcb", backbone_per_output=True)


@register_preset
def model_0012_regnet() -> ModelConfig:
    """The seed's next line (announced, never described): ours is a RegNetY-4GF backbone (Xception-sized,
    faster), the purpose and speed as inputs, and the history through 2 LSTMs handing on their thought
    vector — the seed's last finding (0008 v7) that the thought vector lets frames and history train together."""
    return ModelConfig(
        name="model_0012_regnet",
        backbone="regnety_040",
        history="lstm",
        history_length=60,
        history_lstm_units=128,
        history_lstm_layers=2,
        history_output="thought",
        use_speed=True,
        use_purpose=True,
        outputs=tuple(default_outputs(3)),
        **_SEED,
    )


# --- CPU presets ---------------------------------------------------------------------------------------


@register_preset
def tiny() -> ModelConfig:
    """A RegNetX-200MF at 160x90 with a 256-wide trunk: ~2.5M parameters, about 0.1 s per batch of 16 on two
    CPU cores, so the demo and CI train it for real in minutes."""
    return ModelConfig(
        name="tiny",
        backbone="regnetx_002",
        width=160,
        height=90,
        common_widths=(256,),
        head_layers=3,
        head_divisor=4,
        outputs=tuple(default_outputs(3)),
    )


@register_preset
def tiny_memory() -> ModelConfig:
    """``tiny`` with speed, purpose and a 30-row history through one small LSTM's thought vector."""
    return tiny().replace(
        name="tiny_memory",
        history="lstm",
        history_length=30,
        history_lstm_units=64,
        history_lstm_layers=1,
        history_output="thought",
        use_speed=True,
        use_purpose=True,
    )
