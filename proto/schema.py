"""The JSON Schema of every message header, generated from the wire structs (charles.proto.wire).

``python -m charles.proto.schema`` (or ``make schema``) writes proto/schema.json; a test checks that the
file in the repository is what the structs say now. A client in another language validates a header
(the msgpack map of frame 1, read as JSON-like data) against ``$defs/<Kind>Message``, or against the
whole document, which accepts any kind. Blobs are not in it: a header names them by index.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec

from charles.proto import wire

PATH = Path(__file__).with_name("schema.json")


def schema() -> dict:
    """One document: every kind's header in ``$defs``, and ``oneOf`` them at the top."""
    kinds = list(wire.ENVELOPES.values())
    refs, defs = msgspec.json.schema_components(kinds, ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Charles message header, schema version {wire.SCHEMA_VERSION}",
        "description": (
            "Frame 1 of a Charles message [topic, header, *blobs]: a msgpack map. Generated from "
            "charles.proto.wire by `python -m charles.proto.schema`; see proto/README.md."
        ),
        "oneOf": list(refs),
        "$defs": defs,
    }


def text() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    PATH.write_text(text())
    print(f"wrote {PATH} ({len(wire.ENVELOPES)} kinds)", file=sys.stderr)


if __name__ == "__main__":
    main()
