"""The request path compiled with mypyc: which modules, how they are built, and the guard
that never lets a compiled module run in place of a newer source.

The modules in `MODULES` are ordinary, type-checked Python. `make venv` (so `make demo`
and `make test`) compiles them with mypyc into C extensions beside their sources
(`python -m sidecar.mypycbuild`); Python imports an extension before a `.py` of the
same name, so the sidecar then runs them compiled. The build writes `_compiled.json`, each
module's source hash. At `import sidecar`, `guard()` compares it with the sources: if any
source changed since the build, or `SIDECAR_PURE=1` is set, every module of the list is
loaded from its source instead (all or none: compiled modules call each other directly).
Without a C compiler the build reports why and the sidecar runs as plain Python.
"""

from __future__ import annotations

import hashlib
import importlib.abc
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
    "sidecar.policy.authn",
    "sidecar.policy.authz",
    "sidecar.policy.pathnorm",
    "sidecar.identity.peer",
)
GROUP = "sidecar._hot"  # the shared library's module: sidecar/_hot__mypyc.*.so
PURE_ENV = "SIDECAR_PURE"

_ROOT = Path(__file__).resolve().parent.parent  # the directory that holds `sidecar/`
MANIFEST = Path(__file__).resolve().with_name("_compiled.json")


def source(module: str) -> Path:
    """The `.py` file of one of `MODULES`."""
    return _ROOT.joinpath(*module.split(".")).with_suffix(".py")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _extensions() -> list[Path]:
    """Every extension module in the package: only the build makes any."""
    package = _ROOT / "sidecar"
    sfx = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(p for p in package.rglob("*.*") if p.name.endswith(sfx))


def state() -> str:
    """`compiled` (every module's extension matches its source), `pure` (no build, or
    SIDECAR_PURE set) or `stale` (a source changed since the build: run as `pure`)."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return "pure"
    try:
        built = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return "stale" if _extensions() else "pure"
    try:
        same = built == {m: _digest(source(m)) for m in MODULES}
    except OSError:
        same = False
    return "compiled" if same else "stale"


class _FromSource(importlib.abc.MetaPathFinder):
    """Loads each module of `MODULES` from its `.py`, never from an extension beside it."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source(fullname))


def guard() -> str:
    """Called once by `import sidecar`: unless the build matches the sources, the modules
    load from source. Returns `state()`."""
    st = state()
    if (
        st != "compiled"
        and _extensions()
        and not any(isinstance(f, _FromSource) for f in sys.meta_path)
    ):
        sys.meta_path.insert(0, _FromSource())
    return st


def running() -> str:
    """What this process runs: `compiled` when the modules loaded are extensions, else
    `pure` (or `stale` when a build exists but is older than the sources)."""
    mod = sys.modules.get(MODULES[0])
    if mod is not None and str(getattr(mod, "__file__", "")).endswith(".py"):
        st = state()
        return "stale" if st == "stale" else "pure"
    return state()
