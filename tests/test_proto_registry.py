"""The registry is the one picture of the wire: names and ports must be unique and complete."""

from charles.proto import registry
from charles.proto.codec import _CODECS
from charles.proto.registry import KINDS


def test_ports_are_unique_and_explicit():
    reg = registry()
    ports = list(reg.ports.values()) + [s.http_port for s in reg.services.values()]
    assert len(ports) == len(set(ports)), "a port is used twice"
    assert all(1024 < p < 65536 for p in ports)


def test_every_bus_kind_has_a_topic_and_a_codec():
    reg = registry()
    carried = {t.kind for t in reg.topics.values()}
    assert carried == set(KINDS)
    assert set(KINDS) <= set(_CODECS)


def test_topic_lookup_by_family_and_bounded_labels():
    reg = registry()
    assert reg.topic("sample.collector-3").family == "sample"
    assert reg.topic(b"weights.model_0001").last_value
    assert reg.topic("samples") is None
    assert reg.family(b"\xff\x00") == "unknown" and reg.family("nosuch.x") == "unknown"


def test_topics_have_sane_bounds():
    for t in registry().topics.values():
        assert t.hwm > 0 and t.max_bytes > 0 and t.rate_hz >= 0 and t.senders and t.receivers and t.about
