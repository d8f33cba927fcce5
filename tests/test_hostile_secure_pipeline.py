"""``charles up --secure``: every service on CURVE with its role's key, and the pipeline still trains.

What the role table allows must be exactly what the services do: not one legitimate message or
subscription refused while sim collectors feed the balancer, the trainer trains and the player drives the
trainer's weights. Then an allowed collector key forges weights: the broker refuses it, and the player
keeps the trainer's.
"""

from __future__ import annotations

import re
import time

import pytest
import zmq
import zmq.auth

from charles.model.presets import get_config
from charles.proto import Weights, encode

from survive_support import Pipeline, rss_growth_within, rss_mb, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.system]

CONFIG = {
    "model": {"preset": "tiny", "overrides": {"width": 64, "height": 36}},
    "collector": {"realtime": True},
    "balancer": {"set_timeout_s": 0.25, "picture_s": 0},
    "trainer": {
        "batch_size": 4,
        "buffer": {"capacity": 64, "start_fraction": 0.25},
        "publish_every": 2,
        "publish_on_start": True,
        "torch_threads": 1,
        "decode_threads": 1,
    },
    "player": {"threads": 1, "terminal": False, "swap": "immediate", "convcam": False},
    "service": {"shutdown_s": 5},
}
REFUSALS = (
    "forbidden_topic",
    "spoofed_sender",
    "forbidden_subscription",
    "revoked_key",
    "too_many_subscriptions",
)


def model_batch(p: Pipeline) -> int:
    """The batch of the weights the player drives (-1: none yet, or it did not answer in time)."""
    try:
        return p.state("player")["info"].get("model_batch", -1)
    except (OSError, ValueError, KeyError):
        return -1


def test_every_service_on_curve_trains_and_a_forged_weights_is_refused(tmp_path):
    p = Pipeline(tmp_path, CONFIG, collectors=1, extra=["--secure", "--no-viewer"])
    p.names.remove("viewer")
    ctx = zmq.Context()
    try:
        wait_for(
            lambda: model_batch(p) >= 2,
            300,
            "the player never drove trained weights",
            0.5,
        )
        pids = p.pids()
        rss0 = {n: rss_mb(pid) for n, pid in pids.items()}  # warmed up: the player drives trained weights
        broker = p.scrape("broker")
        assert {r: broker.value("charles_rejects_total", reason=r) for r in REFUSALS} == dict.fromkeys(
            REFUSALS, 0.0
        ), "a legitimate message or subscription was refused"
        assert broker.value("charles_messages_total", direction="through", topic="weights") >= 2

        # an allowed collector key forges weights of a far later batch
        keys = p.run_dir / "keys"
        s = ctx.socket(zmq.PUB)
        s.linger = 0
        s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(keys / "collector.key_secret")
        s.curve_serverkey, _ = zmq.auth.load_certificate(keys / "broker.key")
        port = re.search(r"secure_publish=(\d+)", p.log("broker")).group(1)
        s.connect(f"tcp://127.0.0.1:{port}")
        cfg = get_config("tiny", width=64, height=36)
        forged = Weights("tiny", "tiny_v1", 10**6, cfg.to_dict(), b"not safetensors", time.time())
        wait_for(
            lambda: (
                s.send_multipart(encode("weights.tiny", forged, "trainer-x"))
                or p.scrape("broker").value(
                    "charles_broker_refused_total", reason="forbidden_topic", role="collector"
                )
                >= 1
            ),
            30,
            "forged weights not refused at the broker",
            0.5,
        )
        assert 2 <= model_batch(p) < 10**6
        assert p.scrape("player").value("charles_rejects_total") == 0  # it never even saw them
        assert p.pids() == pids, "a service restarted (crashed)"
        # the broker's queues may hold up to broker.queue_bytes by design (tests/test_broker_queues.py)
        rss_growth_within(rss0, pids, "after the forged weights", exempt=("broker",))
    finally:
        ctx.destroy(linger=0)
        rc = p.close()
    assert rc == 0, f"charles up exited with {rc}; see {p.root}"
