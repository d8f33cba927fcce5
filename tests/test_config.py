"""Typed configuration: file, environment and overrides, with clear errors."""

import pytest

from charles import config


def test_sources_in_order_file_env_override(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("run: from-file\nbus:\n  host: filehost\n  connect_timeout_s: 3\n")
    cfg = config.load(
        f,
        environ={"CHARLES__BUS__HOST": "envhost", "CHARLES__SERVICE__LOG_LEVEL": "DEBUG"},
        overrides=["bus.connect_timeout_s=7.5"],
    )
    assert cfg.run == "from-file"
    assert cfg.bus.host == "envhost"
    assert cfg.service.log_level == "DEBUG"
    assert cfg.bus.connect_timeout_s == 7.5


def test_env_values_are_typed():
    cfg = config.load(
        environ={
            "CHARLES__BROKER__SECURE": "true",
            "CHARLES__SERVICE__HTTP_PORT": "9200",
            "CHARLES_CONFIG": "",
        }
    )
    assert cfg.broker.secure is True and cfg.service.http_port == 9200


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"bus": {"hots": "x"}}, "unknown setting"),
        ({"service": {"http_port": 70000}}, "outside"),
        ({"service": {"heartbeat_s": "soon"}}, "expected float"),
        ({"service": {"log_format": "xml"}}, "not one of"),
        ({"broker": {"secure": "maybe"}}, "true or false"),
        ({"service": {"shutdown_s": float("nan")}}, "finite"),
        ({"nosection": {}}, "unknown section"),
    ],
)
def test_bad_values_say_which_and_why(data, needle):
    with pytest.raises(config.ConfigError, match=needle):
        config.load(data=data, environ={})


def test_an_unknown_section_lists_every_section():
    with pytest.raises(config.ConfigError) as e:
        config.load(environ={}, overrides=["trainr.lr=0.1"])
    message = str(e.value)
    assert "'trainr'" in message
    for name in [*config.SECTIONS, "bus", "broker", "service"]:
        assert f"'{name}'" in message, f"{name} is not named in: {message}"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml", environ={})


def test_resolved_config_round_trips_and_renders_help():
    cfg = config.load(environ={}, overrides=["run=demo"])
    again = config.from_data(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    text = config.render(cfg)
    assert "# Broker host name or address" in text and "run: demo" in text
