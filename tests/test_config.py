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


def test_a_bare_off_or_on_is_the_choice_of_that_name_not_a_boolean(tmp_path):
    """YAML 1.1 reads off and on as false and true: in a file, in --set and in CHARLES__* alike, a setting
    whose choices are named so gets the name back (trainer.publish: off, trainer.channels_last: on)."""
    f = tmp_path / "run.yaml"
    f.write_text("trainer:\n  publish: off\n")
    cfg = config.load(f, environ={"CHARLES__TRAINER__CHANNELS_LAST": "on"}, overrides=["player.follow=v3"])
    assert (cfg.trainer.publish, cfg.trainer.channels_last) == ("off", "on")
    assert (
        config.load(data={}, environ={}, overrides=["trainer.channels_last=off"]).trainer.channels_last
        == "off"
    )
    with pytest.raises(config.ConfigError, match="not one of"):  # no choice named on: still refused
        config.load(data={"trainer": {"publish": True}}, environ={})


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"bus": {"hots": "x"}}, "unknown setting"),
        ({"service": {"http_port": 70000}}, "outside"),
        ({"service": {"heartbeat_s": "soon"}}, "expected float"),
        ({"service": {"log_format": "xml"}}, "not one of"),
        ({"broker": {"secure": "maybe"}}, "true or false"),
        ({"player": {"follow": "v3@latest"}}, "not a version of a line"),
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
