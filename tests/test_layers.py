"""The import graph keeps the layers: every module of schemas, omniroute, router and consumers
is parsed (not imported) and each import it makes, at the top, inside a function or under
``TYPE_CHECKING``, must point at a layer its own layer may use.

    schemas                      → schemas
    omniroute.errors             → schemas, omniroute.errors
    omniroute.infra (and the package's own __init__)
                                 → schemas, omniroute.errors, omniroute.infra
    omniroute.domain             → … and omniroute.domain
    router                       → … and omniroute.domain, router        (never consumers, commands)
    consumers                    → … and omniroute.domain, consumers     (never router, commands)
    omniroute.twilio_emulator    → schemas, omniroute.errors, omniroute.infra, itself
    omniroute.commands, omniroute.__main__ → anything: the composition root

so only the composition root imports router or consumers.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "omniroute", "router", "consumers")

BASE = frozenset({"schemas", "omniroute", "omniroute.errors", "omniroute.infra"})
ALLOWED: dict[str, frozenset[str]] = {
    "schemas": frozenset({"schemas"}),
    "omniroute.errors": frozenset({"schemas", "omniroute.errors"}),
    # The package's __init__ runs before any of its modules: it may not pull a layer up.
    "omniroute": BASE,
    "omniroute.infra": BASE,
    "omniroute.domain": BASE | {"omniroute.domain"},
    "router": BASE | {"omniroute.domain", "router"},
    "consumers": BASE | {"omniroute.domain", "consumers"},
    "omniroute.twilio_emulator": BASE | {"omniroute.twilio_emulator"},
}
ROOT_LAYERS = frozenset({"omniroute.commands", "omniroute.__main__"})
LAYERS = (*ALLOWED, *ROOT_LAYERS)


@dataclass(frozen=True)
class Import:
    importer: str
    path: Path
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} imports {self.target}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> str | None:
    """The layer a first-party module belongs to (None: not one of ours)."""
    for candidate in sorted(LAYERS, key=len, reverse=True):
        if module == candidate or module.startswith(candidate + "."):
            return candidate
    return None


def _resolve_from(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(source: str, importer: str, path: Path) -> list[Import]:
    """Every first-party module ``source`` imports, wherever the import statement is."""
    is_package = path.name == "__init__.py"
    found: list[Import] = []
    for node in ast.walk(ast.parse(source, str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, importer, is_package)
            # ``from omniroute import infra`` imports the module omniroute.infra.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            targets = [node.args[0].value]
        found += [
            Import(importer, path, node.lineno, target)  # type: ignore[attr-defined]
            for target in targets
            if target.split(".")[0] in PACKAGES
        ]
    return sorted(found, key=lambda i: (i.line, i.target))


def violations(layer: str) -> list[str]:
    allowed = ALLOWED[layer]
    out: list[str] = []
    for module, path in MODULES.items():
        if layer_of(module) != layer:
            continue
        for found in imports_of(path.read_text(encoding="utf-8"), module, path):
            target_layer = layer_of(found.target)
            if target_layer is not None and target_layer not in allowed:
                out.append(str(found))
    return out


@pytest.mark.parametrize("layer", list(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    assert violations(layer) == []


def test_every_module_belongs_to_a_layer() -> None:
    assert len(MODULES) > 50
    assert {m for m in MODULES if layer_of(m) is None} == set()
    # The finder sees the graph: the stages do use the domain and the plumbing.
    consumed = {
        i.target
        for i in imports_of(
            MODULES["consumers.runtime"].read_text(),
            "consumers.runtime",
            MODULES["consumers.runtime"],
        )
    }
    assert any(t.startswith("omniroute.infra.") for t in consumed)
    for required in ("omniroute.infra.bus", "omniroute.domain.conversation", "router.app"):
        assert required in MODULES


def test_only_the_composition_root_imports_router_or_consumers() -> None:
    importers = {
        layer_of(found.importer)
        for module, path in MODULES.items()
        for found in imports_of(path.read_text(encoding="utf-8"), module, path)
        if found.target.split(".")[0] in ("router", "consumers")
        and found.target.split(".")[0] != module.split(".")[0]
    }
    assert importers <= ROOT_LAYERS


def test_the_parser_sees_imports_in_functions_type_checking_and_relative_forms() -> None:
    """The rules are only as good as the import finder: it must not miss the hidden forms."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from router.state import BUS\n"
        "def late():\n"
        "    import consumers.runtime\n"
        "    from .. import commands\n"
        "    from . import bus\n"
        "    return importlib.import_module('omniroute.domain.window')\n"
        "class A:\n"
        "    def m(self):\n"
        "        from omniroute import errors\n"
    )
    path = ROOT / "omniroute" / "infra" / "example.py"
    found = [(i.line, i.target) for i in imports_of(source, "omniroute.infra.example", path)]
    assert found == [
        (3, "router.state"),
        (5, "consumers.runtime"),
        (6, "omniroute.commands"),
        (7, "omniroute.infra.bus"),
        (8, "omniroute.domain.window"),
        (11, "omniroute.errors"),
    ]
    assert [layer_of(t) for _, t in found] == [
        "router",
        "consumers",
        "omniroute.commands",
        "omniroute.infra",
        "omniroute.domain",
        "omniroute.errors",
    ]
