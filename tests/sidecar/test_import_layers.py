"""The sidecar's folders are layers (docs/architecture.md): a module imports from its own
folder or from a layer below, never from above. Imports under `if TYPE_CHECKING:` (type
hints only) are exempt."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / "sidecar"

LAYERS = {
    "compiled": -1,  # which modules run compiled; `import sidecar` runs its guard
    "mypycbuild": 0,
    "__init__": 0,
    "errors": 0,
    "trafficconfig": 0,
    "protocols": 0,
    "config": 1,
    "identity": 2,
    "policy": 2,
    "upstream": 2,
    "telemetry": 2,
    "initnet": 2,
    "heap": 2,
    "localhttp": 1,
    "engines": 3,
    "routing": 4,
    "admin": 5,
    "cli": 6,
    "__main__": 7,
}


def part(module: str) -> str:
    """`sidecar.identity.trust` -> `identity`; `sidecar` -> `__init__`."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def runtime_imports(tree: ast.Module) -> list[str]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sidecar"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("sidecar")]
    return found


def test_every_sidecar_module_is_in_a_layer():
    tops = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")}
    assert tops - set(LAYERS) == set()


def test_no_import_goes_up_a_layer():
    wrong = []
    checked = 0
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        here = rel.parts[0].removesuffix(".py")
        for module in runtime_imports(ast.parse(path.read_text())):
            there = part(module)
            checked += 1
            if there != here and LAYERS[there] >= LAYERS[here] and there != "__init__":
                wrong.append(f"sidecar/{rel} imports {module}")
    assert checked > 40
    assert wrong == []
