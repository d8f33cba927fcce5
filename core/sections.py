"""Registers the typed configuration sections of the services with charles.config.

Each service package keeps its config dataclass next to its logic; this module is the one place that
folds them into the run configuration (so `charles config show` and the broker's config service see all).
"""

from __future__ import annotations

import importlib

from charles.config import register_section

# section name -> "module:DataclassName"; a module that is not there yet is skipped.
_SECTIONS: dict[str, str] = {
    "balancer": "charles.balancer.config:BalancerConfig",
}

for _name, _target in _SECTIONS.items():
    _mod, _cls = _target.split(":")
    register_section(_name, getattr(importlib.import_module(_mod), _cls))
