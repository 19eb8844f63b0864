"""The request path compiled with mypyc (sidecar/compiled.py): `make venv` builds it, and a
compiled module never runs in place of a newer source.

Python imports an extension module before a `.py` of the same name, so a build older than
its sources would run old code. These tests copy the package to a temp dir, put a stand-in
extension beside a source (an empty file: importing it would fail), and check from a fresh
interpreter what loads: the guard must load every listed module from its source whenever
the manifest does not match, or SIDECAR_PURE is set.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import compiled

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import json, sidecar.compiled as c\n"
    "import sidecar.engines.http1.downstream, sidecar.routing.inbound\n"
    "import sys\n"
    "print(json.dumps({'running': c.running(), 'files': "
    "{m: sys.modules[m].__file__ for m in c.MODULES if m in sys.modules}}))\n"
)


def probe(root: Path, **env: str) -> dict:
    """What a fresh interpreter with `root` first on its path loads."""
    environ = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**environ, "PYTHONPATH": str(root), **env},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def copy_package(tmp: Path) -> Path:
    """The package as plain sources (no build), under `tmp`."""
    shutil.copytree(
        ROOT / "sidecar",
        tmp / "sidecar",
        ignore=lambda d, names: [
            n
            for n in names
            if n == "__pycache__"
            or n == compiled.MANIFEST.name
            or n.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        ],
    )
    return tmp


def fake_build(root: Path, digests: dict[str, str]) -> None:
    """A stand-in build: an unloadable extension beside each listed module, and a manifest."""
    for module in compiled.MODULES:
        src = root.joinpath(*module.split(".")).with_suffix(".py")
        src.with_name(src.stem + importlib.machinery.EXTENSION_SUFFIXES[0]).write_bytes(b"")
    (root / "sidecar" / compiled.MANIFEST.name).write_text(json.dumps(digests))


def digests_of(root: Path) -> dict[str, str]:
    return {
        m: hashlib.sha256(root.joinpath(*m.split(".")).with_suffix(".py").read_bytes()).hexdigest()
        for m in compiled.MODULES
    }


def test_without_a_build_everything_runs_from_source(tmp_path):
    root = copy_package(tmp_path)
    got = probe(root)
    assert got["running"] == "pure"
    assert all(f.endswith(".py") and f.startswith(str(root)) for f in got["files"].values())


def test_a_source_changed_after_the_build_runs_every_module_from_source(tmp_path):
    root = copy_package(tmp_path)
    digests = digests_of(root)
    fake_build(root, digests)
    # One module edited since the build: all of them load from source (compiled modules
    # call each other directly, so a mix would still run the old code).
    edited = root / "sidecar" / "engines" / "http1" / "framing.py"
    edited.write_text(edited.read_text() + "\n# edited after the build\n")
    got = probe(root)
    assert got["running"] == "stale"
    assert set(got["files"]) >= {"sidecar.engines.http1.downstream", "sidecar.routing.inbound"}
    assert all(f.endswith(".py") for f in got["files"].values()), got


def test_sidecar_pure_runs_from_source_even_when_the_build_matches(tmp_path):
    root = copy_package(tmp_path)
    fake_build(root, digests_of(root))
    got = probe(root, SIDECAR_PURE="1")
    assert got["running"] == "pure"
    assert all(f.endswith(".py") for f in got["files"].values()), got


def test_a_matching_build_is_what_loads(tmp_path):
    """The other side of the guard: with a manifest that matches, the extension is imported
    (here the stand-in, which cannot load: the import fails, naming it)."""
    root = copy_package(tmp_path)
    fake_build(root, digests_of(root))
    out = subprocess.run(
        [sys.executable, "-c", "import sidecar.engines.http1.downstream"],
        env={**os.environ, "PYTHONPATH": str(root), compiled.PURE_ENV: ""},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "downstream" in out.stderr and "ImportError" in out.stderr


def test_a_missing_or_unreadable_manifest_counts_as_stale(tmp_path):
    root = copy_package(tmp_path)
    fake_build(root, digests_of(root))
    (root / "sidecar" / compiled.MANIFEST.name).write_text("{not json")
    assert probe(root)["running"] == "stale"
    (root / "sidecar" / compiled.MANIFEST.name).unlink()
    assert probe(root)["running"] == "stale"


@pytest.mark.skipif(
    shutil.which("cc") is None or importlib.util.find_spec("mypyc") is None,
    reason="no C compiler or no mypyc here: `make venv` leaves the request path as plain Python",
)
def test_make_venv_compiled_the_request_path():
    """`make test` runs `make venv`, which builds the request path: this checkout's
    sidecar runs it compiled (else run `make venv` after editing one of its modules)."""
    got = probe(ROOT)
    assert got["running"] == "compiled", got
    assert all(not f.endswith(".py") for f in got["files"].values()), got
