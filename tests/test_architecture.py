"""The import rule, read from the real imports (every ``import`` and ``from`` statement, in functions too,
and ``importlib.import_module`` of a literal name):

- no service package (broker, collector, balancer, trainer, player, viewer, judge) imports another one;
- core (the ``charles`` package's own modules) imports no service;
- ``charles.sim`` and ``charles.agents`` do not import each other (what both need lives lower down);
- ``charles.drive`` imports only ``charles.proto``, and ``charles.model`` lazily (inside a function).

A violation fails with the file and line of the offending import.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = frozenset(
    f"charles.{s}" for s in ("broker", "collector", "balancer", "trainer", "player", "viewer", "judge")
)
CORE = "charles"

KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}
"""(file, imported package) -> why it is allowed for now. Empty is the goal; each entry says its way out."""


def packages() -> dict[str, Path]:
    """Import name -> folder, from pyproject.toml's package-dir (the one mapping the build uses)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder for name, folder in cfg["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every module of every package: dotted name -> file (a folder mapped to its own package wins)."""
    pkgs = packages()
    claimed = {folder.resolve() for folder in pkgs.values()}
    out = {}
    for name, folder in pkgs.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            # a sub-folder that is a package of its own (services/... under no other) is not this one's
            if any(p.resolve() in claimed and p.resolve() != folder.resolve() for p in f.parents):
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = f
    return out


def owner(module: str, pkgs: dict[str, Path]) -> str:
    """The package a dotted module belongs to: the longest package-dir name it starts with."""
    best = ""
    for name in pkgs:
        if (module == name or module.startswith(name + ".")) and len(name) > len(best):
            best = name
    return best


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    here = module if is_pkg else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = here.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    found.append((sub if sub in known else base, child.lineno, lazy))
            elif (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr == "import_module"
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
            ):
                found.append((child.args[0].value, child.lineno, lazy))
            visit(child, inner)

    visit(tree, False)
    return found


def violations() -> list[str]:
    pkgs = packages()
    mods = modules()
    known = set(mods)
    bad = []
    for module, path in sorted(mods.items()):
        mine = owner(module, pkgs)
        rel = str(path.relative_to(ROOT))
        for target, line, lazy in sorted(set(imports(module, path, known)), key=lambda t: t[1]):
            if not (target == "charles" or target.startswith("charles.")):
                continue
            theirs = owner(target, pkgs)
            why = rule(mine, theirs, lazy)
            if why and (rel, theirs) not in KNOWN_EXCEPTIONS:
                bad.append(f"{rel}:{line}: imports {target} ({why})")
    return bad


def rule(mine: str, theirs: str, lazy: bool) -> str | None:
    """Why ``mine`` may not import ``theirs`` (None: it may)."""
    if not theirs or theirs == mine:
        return None
    if mine in SERVICES and theirs in SERVICES:
        return "a service imports another service"
    if mine == CORE and theirs in SERVICES:
        return "core imports a service"
    if {mine, theirs} == {"charles.sim", "charles.agents"}:
        return "sim and agents import each other"
    if mine == "charles.drive" and theirs != "charles.proto" and not (theirs == "charles.model" and lazy):
        return "charles.drive imports only charles.proto (and charles.model inside a function)"
    return None


def test_every_module_is_read():
    """The rule sees the packages it is about (a moved folder must not make it vacuous)."""
    mods = modules()
    pkgs = packages()
    for pkg in [*SERVICES, CORE, "charles.sim", "charles.agents", "charles.drive"]:
        assert any(owner(m, pkgs) == pkg for m in mods), f"no module of {pkg} found"
    assert "charles.drive.policy" in mods and "charles.config" in mods


def test_the_rule_reads_function_level_and_relative_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "import charles.proto\n"
        "def later():\n"
        "    from charles.model.predictor import Predictor\n"
        "    import importlib\n"
        "    importlib.import_module('charles.sections.trainer')\n"
        "from . import sibling\n"
    )
    got = imports("charles.drive.m", f, {"charles.drive.sibling"})
    assert got == [
        ("charles.proto", 1, False),
        ("charles.model.predictor", 3, True),
        ("importlib", 4, True),
        ("charles.sections.trainer", 5, True),
        ("charles.drive.sibling", 6, False),
    ]
    assert rule("charles.drive", "charles.model", lazy=True) is None
    assert rule("charles.drive", "charles.model", lazy=False)
    assert rule("charles.drive", "charles.sim", lazy=True)
    assert rule("charles.player", "charles.collector", lazy=True)
    assert rule("charles", "charles.trainer", lazy=True)
    assert rule("charles.agents", "charles.sim", lazy=False)
    assert rule("charles.player", "charles.sim", lazy=False) is None


def test_no_import_breaks_the_rule():
    bad = violations()
    assert not bad, "imports against the rule (tests/test_architecture.py says why):\n" + "\n".join(bad)
