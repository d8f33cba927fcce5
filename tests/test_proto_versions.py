"""Versions on the wire (charles.proto.versions): topics, version references, and which weights a player follows."""

from __future__ import annotations

import pytest

from charles.proto.versions import (
    Follow,
    Follower,
    Offer,
    line_prefix,
    parse_ref,
    version_of_topic,
    weights_topic,
)


def test_a_version_has_its_own_topic_under_the_line_prefix():
    assert weights_topic("tiny", 3) == "weights.tiny.v3"
    assert weights_topic("tiny", 3).startswith(line_prefix("tiny"))  # what the judge subscribes to
    assert version_of_topic("weights.tiny.v3", "tiny") == 3
    assert version_of_topic("weights.tiny", "tiny") is None  # an older trainer's: the run says which
    # another line whose name starts with this one's, and suffixes that name no version, are not ours
    for topic in (
        "weights.tiny_memory.v1",
        "weights.tiny_memory",
        "weights.tiny.3",
        "weights.tiny.v",
        "weights.tinyv1",
    ):
        assert version_of_topic(topic, "tiny") is False, topic


@pytest.mark.parametrize(
    "text, want",
    [
        ("v3", (3, None)),
        ("3", (3, None)),
        ("tiny_v3", (3, None)),
        ("v3@1200", (3, 1200)),
        ("tiny_v12@0", (12, 0)),
    ],
)
def test_version_references(text, want):
    assert parse_ref(text, "tiny") == want


@pytest.mark.parametrize(
    "text, says",
    [
        ("other_v3", "a version of line 'other', not of 'tiny'"),
        ("v3@x", "not a version of tiny"),
        ("v0", "versions start at 1"),
        ("latest", "not a version of tiny"),
    ],
)
def test_bad_references_say_what_was_asked(text, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):
        parse_ref(text, "tiny")


def test_follow_forms():
    assert Follow.parse("newest", "tiny") == Follow("newest")
    assert Follow.parse("tiny_v2", "tiny") == Follow("version", 2)
    assert Follow.parse("v2@40", "tiny") == Follow("batch", 2, 40)
    assert Follow.parse("runs/tiny/tiny_v2/checkpoints/batch_000000040", "tiny").mode == "file"
    assert Follow.parse("w.safetensors", "tiny") == Follow("file", path="w.safetensors")
    assert Follow.parse("v2@40", "tiny").describe("tiny") == "tiny_v2@40"


def test_newest_follows_the_stream_started_last_and_never_flips_back():
    f = Follower(Follow("newest"))
    v1, v2 = Offer(1, since=100.0, batch=10), Offer(2, since=200.0, batch=2)
    assert f.verdict(v1) == "take"
    f.took(v1)
    assert f.verdict(v2) == "take"  # a newer version's trainer started later
    f.took(v2)
    assert f.verdict(Offer(1, 100.0, 50)) == "not_followed"  # v1 keeps training: it does not take over again
    assert f.verdict(Offer(2, 200.0, 4)) == "take"
    assert f.verdict(Offer(2, 200.0, 1)) == "older_batch"
    # `charles stream v1@24500` after v2: a new stream of v1, started last: every newest player takes it
    assert f.verdict(Offer(1, 300.0, 24500)) == "take"
    f.took(Offer(1, 300.0, 24500))
    # and a stream of the same version from an earlier batch (continuing from a chosen checkpoint) too
    assert f.verdict(Offer(1, 400.0, 100)) == "take"
    # senders that say no since: the higher version
    g = Follower(Follow("newest"))
    g.took(Offer(1, 0.0, 10))
    assert g.verdict(Offer(2, 0.0, 1)) == "take" and g.verdict(Offer(1, 0.0, 11)) == "take"


def test_a_pinned_follower_takes_its_version_or_its_batch_only():
    f = Follower(Follow("version", 1))
    assert f.verdict(Offer(2, 999.0, 5)) == "not_followed"
    assert f.verdict(Offer(1, 1.0, 5)) == "take"
    f.took(Offer(1, 1.0, 5))
    assert f.verdict(Offer(2, 999.0, 6)) == "not_followed"
    b = Follower(Follow("batch", 1, 40))
    assert b.verdict(Offer(1, 1.0, 38)) == "not_followed"
    assert b.verdict(Offer(2, 1.0, 40)) == "not_followed"
    assert b.verdict(Offer(1, 1.0, 40)) == "take"
    b.took(Offer(1, 1.0, 40))
    assert b.verdict(Offer(1, 1.0, 40)) == "not_followed"  # the same again: nothing to load
    assert b.verdict(Offer(1, 5.0, 40)) == "take"  # streamed again (the broker restarted, say)
    assert Follower(Follow("file", path="w.safetensors")).verdict(Offer(1, 1.0, 1)) == "not_followed"
