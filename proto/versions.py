"""Versions on the wire: weights topics that name the version, and which weights a player follows.

A model line trains several versions at once (the seed's model_0008 v2 and v3), so every version's
weights travel on a topic of their own, ``weights.<line>.v<N>``, and the broker keeps the newest message
of each (its last-value cache is keyed by topic). Subscribing to the prefix ``weights.<line>`` still gets
every version of the line (and the legacy ``weights.<line>`` topic of older trainers); a receiver checks
the topic exactly (``version_of_topic``), since that prefix also matches ``weights.<line>_memory``.

Which weights a player drives is ``player.follow`` (``Follow``):

- ``newest``: the version whose *stream* started last. A stream starts when a trainer that publishes
  (``trainer.publish: live``) starts a training period, or when ``charles stream`` puts a saved checkpoint
  on the bus; the weights carry that moment as ``since``. So two trainers of one line never interleave
  in a player (it stays with the one started last), and "started streaming v1 from batch 24500" after v2
  is one command that every ``newest`` player obeys. Ties (older senders say no ``since``) go to the
  higher version.
- ``v3`` (or ``3``, or ``<line>_v3``): that version only, newest batch of its newest stream.
- ``v3@184250``: that version at that batch only (``charles stream v3@184250`` puts it on the bus).
- a path: a checkpoint folder (``batch_000184250/``) or a safetensors weights file, loaded at start; the
  player then reads no weights from the bus.

Imports: the standard library only (charles.proto may be imported by everyone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

FAMILY = "weights"
_RUN = re.compile(r"^(?P<line>.+)_v(?P<version>\d+)$")
_REF = re.compile(r"^(?:(?P<run>.+_v\d+)|v?(?P<version>\d+))(?:@(?P<batch>\d+))?$")
_VERSION_PART = re.compile(r"^v(\d+)$")


def run_name(line: str, version: int) -> str:
    """A version's run name: ``model_0004_inceptionresnetv2`` and 3 -> ``model_0004_inceptionresnetv2_v3``."""
    return f"{line}_v{version}"


def parse_run_name(name: str) -> tuple[str, int] | None:
    """``model_0004_inceptionresnetv2_v3`` -> (line, 3); None when the name has no ``_vN``."""
    m = _RUN.match(name)
    return (m.group("line"), int(m.group("version"))) if m else None


def weights_topic(line: str, version: int) -> str:
    """The topic one version's weights travel on (the broker keeps its newest message)."""
    return f"{FAMILY}.{line}.v{version}"


def line_prefix(line: str) -> str:
    """The subscription prefix for every version of a line (it also matches lines whose name starts with
    this one's: check each topic with ``version_of_topic``)."""
    return f"{FAMILY}.{line}"


def version_of_topic(topic: str, line: str) -> int | None | Literal[False]:
    """The version a weights topic of ``line`` names: N for ``weights.<line>.vN``, None for the legacy
    ``weights.<line>`` (the version is then the message's run), False when the topic is not this line's."""
    prefix = line_prefix(line)
    if topic == prefix:
        return None
    if not topic.startswith(prefix + "."):
        return False
    m = _VERSION_PART.match(topic[len(prefix) + 1 :])
    return int(m.group(1)) if m else False


def parse_ref(text: str, line: str | None) -> tuple[int, int | None]:
    """``v3``, ``3``, ``<line>_v3``, each with an optional ``@<batch>`` -> (version, batch or None).

    Raises ValueError naming what was asked when it is no version of ``line`` (another line's run too;
    ``line`` None checks the form only)."""
    m = _REF.match(text.strip())
    if m is None:
        raise ValueError(
            f"{text!r} is not a version of {line or 'a line'} (v<N>, <N> or <line>_v<N>, optionally @<batch>)"
        )
    if m.group("run"):
        parsed = parse_run_name(m.group("run"))
        assert parsed is not None
        if line is not None and parsed[0] != line:
            raise ValueError(f"{text!r} is a version of line {parsed[0]!r}, not of {line!r}")
        version = parsed[1]
    else:
        version = int(m.group("version"))
    if version < 1:
        raise ValueError(f"{text!r}: versions start at 1")
    batch = m.group("batch")
    return version, int(batch) if batch is not None else None


def ref_text(line: str, version: int, batch: int | None = None) -> str:
    return run_name(line, version) + (f"@{batch}" if batch is not None else "")


@dataclass(frozen=True)
class Follow:
    """What a player drives (``player.follow``): see the module's docstring."""

    mode: Literal["newest", "version", "batch", "file"]
    version: int | None = None
    batch: int | None = None
    path: str = ""

    @classmethod
    def parse(cls, text: str, line: str | None) -> Follow:
        """``newest``, a version of ``line`` (``v3``, ``3``, ``<line>_v3``), ``<version>@<batch>``, or a
        path (it contains ``/`` or ends in ``.safetensors``). Raises ValueError on anything else."""
        text = text.strip()
        if text in ("", "newest"):
            return cls("newest")
        if "/" in text or text.endswith(".safetensors"):
            return cls("file", path=text)
        version, batch = parse_ref(text, line)
        return cls("version" if batch is None else "batch", version, batch)

    def describe(self, line: str) -> str:
        """For consoles and logs: ``newest of tiny``, ``tiny_v3``, ``tiny_v3@1200``, the path."""
        if self.mode == "newest":
            return f"newest of {line}"
        if self.mode == "file":
            return self.path
        assert self.version is not None
        return ref_text(line, self.version, self.batch)


@dataclass(frozen=True)
class Offer:
    """One weights message as the follower sees it: which version, which stream of it, which batch."""

    version: int
    since: float
    batch: int


class Follower:
    """Decides which weights messages a player loads, by its ``Follow``; the player calls ``verdict`` for
    each message and ``took`` once it loaded one. Pure (no sockets, no clock), so every rule is a unit test.

    Verdicts: ``take``, ``not_followed`` (another version, an older stream, or not the pinned batch: the
    normal traffic of a bus with several versions, counted as a drop), ``older_batch`` (an older batch of
    the stream it drives: a replay or a rollback, refused unless ``accept_older``).
    """

    def __init__(self, follow: Follow, accept_older: bool = False):
        self.follow = follow
        self.accept_older = accept_older
        self.current: Offer | None = None
        """The newest offer taken (loaded, maybe not yet swapped in)."""

    def verdict(self, o: Offer) -> str:
        f, cur = self.follow, self.current
        if f.mode == "file":
            return "not_followed"
        if f.mode in ("version", "batch") and o.version != f.version:
            return "not_followed"
        if f.mode == "batch":
            return "take" if o.batch == f.batch and (cur is None or cur != o) else "not_followed"
        if cur is None:
            return "take"
        if f.mode == "newest" and o.version != cur.version:
            return "take" if (o.since, o.version) > (cur.since, cur.version) else "not_followed"
        # the same version: a newer stream of it starts wherever it starts (charles stream v3@1000 after the
        # trainer reached 5000); within one stream the batch only moves forward
        if o.since != cur.since:
            return "take" if o.since > cur.since else "not_followed"
        if o.batch < cur.batch and not self.accept_older:
            return "older_batch"
        return "take"

    def took(self, o: Offer) -> None:
        self.current = o
