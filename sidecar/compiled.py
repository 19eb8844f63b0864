"""The request path compiled with mypyc: which modules, and the guard that never lets a
compiled module run in place of a newer source.

The modules in `MODULES` are ordinary, type-checked Python. `make venv` (so `make demo`
and `make test`) compiles them with mypyc into C extensions beside their sources
(`python -m sidecar.mypycbuild`); Python imports an extension before a `.py` of the
same name, so the sidecar then runs them compiled. The build writes `_compiled.json`:
the interpreter's extension suffix, the modules, each extension file it made, and every
source the compiled code's types come from (all of `sidecar/`, `meshca/` and
pyproject.toml), each with its size, time and hash (the hash decides when only the time
changed: a checkout, a copy into an image). At `import sidecar`, `guard()` checks
that manifest; if anything differs (a source edited, an extension missing or replaced,
another interpreter's build), or `SIDECAR_PURE=1` is set, every module that has an
extension here loads from its source instead (all or none: compiled modules call each
other directly). Without a C compiler the build says why and the sidecar runs as plain
Python.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The per-request path of HTTP/1.1, and what it calls on every request.
MODULES = (
    "sidecar.engines.http1.downstream",
    "sidecar.engines.http1.exchange",
    "sidecar.engines.http1.framing",
    "sidecar.engines.http1.router",
    "sidecar.engines.http1.upstream",
    "sidecar.routing.inbound",
    "sidecar.routing.outbound",
    "sidecar.telemetry.accesslog",
    "sidecar.telemetry.metrics",
    "sidecar.telemetry.record",
    "sidecar.telemetry.sink",
    "sidecar.telemetry.tracing",
    "sidecar.telemetry.window",
    "sidecar.upstream.balancer",
    "sidecar.upstream.outlier",
    "sidecar.upstream.retry",
    "sidecar.upstream.pool",
    "sidecar.upstream.endpoint",
    "sidecar.policy.authn",
    "sidecar.policy.authz",
    "sidecar.policy.pathnorm",
    "sidecar.identity.peer",
)
GROUP = "sidecar._hot"  # the shared library's module: sidecar/_hot__mypyc.*.so
PURE_ENV = "SIDECAR_PURE"

ROOT = Path(__file__).resolve().parent.parent  # the directory that holds `sidecar/`
MANIFEST = Path(__file__).resolve().with_name("_compiled.json")
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # what this interpreter's build names


def source(module: str) -> Path:
    """The `.py` file of a module of the package."""
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def digest(path: Path) -> str:
    """The sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extensions() -> list[Path]:
    """Every extension module in the package, for any interpreter: only the build makes any."""
    sfx = tuple(importlib.machinery.EXTENSION_SUFFIXES) + (".so", ".pyd")
    return sorted(p for p in (ROOT / "sidecar").rglob("*.*") if p.name.endswith(sfx))


def inputs() -> list[Path]:
    """The files compiled code depends on: its own sources and every type they read."""
    return sorted([*(ROOT / "sidecar").rglob("*.py"), *(ROOT / "meshca").rglob("*.py")]) + [
        ROOT / "pyproject.toml"
    ]


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _same_file(rel: str, recorded: list) -> bool:
    """`rel` is what was recorded: the same size and time, or (a checkout, a copy into an
    image: a new time) the same bytes."""
    path = ROOT / rel
    try:
        if _stamp(path) == recorded[:2]:
            return True
        return digest(path) == recorded[2]  # touched (a checkout): the bytes decide
    except (OSError, IndexError, TypeError):
        return False


def state() -> str:
    """`compiled` (the build matches every input and its extensions are all there), `pure`
    (no build, or SIDECAR_PURE set) or `stale` (a build that must not run: from source)."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return "pure"
    try:
        built = json.loads(MANIFEST.read_text())
        ok = (
            built["suffix"] == SUFFIX
            and built["modules"] == list(MODULES)
            and all(_same_file(rel, st) for rel, st in built["extensions"].items())
            and _module_names([ROOT / rel for rel in built["extensions"]])
            >= {*MODULES, GROUP + "__mypyc"}
            and all(_same_file(rel, rec) for rel, rec in built["sources"].items())
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "stale" if extensions() else "pure"
    return "compiled" if ok else "stale"


class _FromSource:
    """Loads each named module from its `.py`, never from an extension beside it.

    A meta path finder by its `find_spec` alone: deriving from `importlib.abc.MetaPathFinder`
    would import `importlib.resources`, and with it tempfile, shutil, bz2 and lzma, into
    every sidecar (0.6 MiB resident) for nothing."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names or not source(fullname).exists():
            return None
        return importlib.util.spec_from_file_location(fullname, source(fullname))


def _module_names(found: list[Path]) -> frozenset[str]:
    names = set()
    for p in found:
        rel = p.relative_to(ROOT)
        names.add(".".join((*rel.parts[:-1], rel.name.split(".", 1)[0])))
    return frozenset(names)


def guard() -> str:
    """Called once by `import sidecar`: unless `state()` is `compiled`, every module with an
    extension in the package loads from its source. Returns `state()`."""
    st = state()
    if st != "compiled" and not any(isinstance(f, _FromSource) for f in sys.meta_path):
        found = extensions()
        if found:
            sys.meta_path.insert(0, _FromSource(_module_names(found)))
    return st


def running() -> str:
    """What this process runs: `compiled` when the modules loaded are extensions, else
    `pure` (or `stale` when a build exists but does not match)."""
    mod = sys.modules.get(MODULES[0])
    if mod is not None and str(getattr(mod, "__file__", "")).endswith(".py"):
        return "stale" if state() == "stale" else "pure"
    return state()


def recorded_sources() -> dict[str, list]:
    """Each input's size, time and hash, as the build records them (before it compiles:
    a source edited during the build then no longer matches)."""
    return {str(p.relative_to(ROOT)): [*_stamp(p), digest(p)] for p in inputs()}


def manifest(sources: dict[str, list], built: list[Path], mypy: str) -> dict:
    """What the build records (see the module's docstring)."""
    return {
        "suffix": SUFFIX,
        "modules": list(MODULES),
        "mypy": mypy,
        "extensions": {str(p.relative_to(ROOT)): [*_stamp(p), digest(p)] for p in built},
        "sources": sources,
    }
