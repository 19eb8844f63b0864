"""The request path compiled with mypyc (sidecar/compiled.py): `make venv` builds it, and a
compiled module never runs in place of a newer source.

Python imports an extension module before a `.py` of the same name, so a build older than
its sources would run old code. These tests copy the package to a temp dir, put a stand-in
extension beside a source (an empty file: importing it would fail), and check from a fresh
interpreter what loads: the guard must load every listed module from its source whenever
the manifest does not match, or SIDECAR_PURE is set.
"""

from __future__ import annotations

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


FAKE_BUILD = (
    "import json, sidecar.compiled as c\n"
    "sources = c.recorded_sources()\n"
    "made = []\n"
    "for m in (*c.MODULES, c.GROUP + '__mypyc'):\n"
    "    p = c.ROOT.joinpath(*m.split('.'))\n"
    "    p = p.with_name(p.name + c.SUFFIX)\n"
    "    p.write_bytes(b'')\n"
    "    made.append(p)\n"
    "c.MANIFEST.write_text(json.dumps(c.manifest(sources, made, 'test')))\n"
)


def copy_package(tmp: Path) -> Path:
    """The packages as plain sources (no build), under `tmp`."""
    skip = tuple(importlib.machinery.EXTENSION_SUFFIXES) + (".so",)
    for package in ("sidecar", "meshca"):
        shutil.copytree(
            ROOT / package,
            tmp / package,
            ignore=lambda d, names: [
                n
                for n in names
                if n == "__pycache__" or n == compiled.MANIFEST.name or n.endswith(skip)
            ],
        )
    shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    return tmp


def fake_build(root: Path) -> None:
    """A stand-in build: an empty (unloadable) extension beside each listed module and
    the group's library, and the manifest the real build writes for them."""
    out = subprocess.run(
        [sys.executable, "-c", FAKE_BUILD],
        env={**os.environ, "PYTHONPATH": str(root)},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-3000:]


def ext_of(root: Path, module: str) -> Path:
    p = root.joinpath(*module.split("."))
    return p.with_name(p.name + compiled.SUFFIX)


def run_in(root: Path, code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with `root` first on its path (SIDECAR_PURE unset)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(root), compiled.PURE_ENV: ""},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )


def loads_the_extension(root: Path) -> bool:
    """Whether importing the engine picks the (stand-in) extension: it cannot load."""
    out = run_in(root, "import sidecar.engines.http1.downstream")
    return out.returncode != 0 and "ImportError" in out.stderr


def all_from_source(got: dict) -> bool:
    return bool(got["files"]) and all(f.endswith(".py") for f in got["files"].values())


def test_without_a_build_everything_runs_from_source(tmp_path):
    root = copy_package(tmp_path)
    got = probe(root)
    assert got["running"] == "pure"
    assert all_from_source(got) and all(f.startswith(str(root)) for f in got["files"].values())


def test_a_matching_build_is_what_loads_even_after_a_touch(tmp_path):
    """The other side of the guard: with a manifest that matches, the extension is imported
    (here the stand-in, which cannot load: the import fails). A source whose time changed
    but whose bytes did not (a checkout) still matches, and so does an extension (a copy
    into a container image that does not keep times)."""
    root = copy_package(tmp_path)
    fake_build(root)
    assert loads_the_extension(root)
    os.utime(root / "sidecar" / "engines" / "http1" / "framing.py", (1, 1))
    assert loads_the_extension(root)
    for module in (*compiled.MODULES, compiled.GROUP + "__mypyc"):
        os.utime(ext_of(root, module), (2, 2))
    assert loads_the_extension(root)


@pytest.mark.parametrize(
    "edited",
    [
        "sidecar/engines/http1/framing.py",  # a compiled module
        "sidecar/upstream/discovery.py",  # not compiled, but compiled code may use its types
        "meshca/svid.py",
        "pyproject.toml",  # mypy's settings
    ],
)
def test_an_input_changed_after_the_build_runs_every_module_from_source(tmp_path, edited):
    root = copy_package(tmp_path)
    fake_build(root)
    path = root / edited
    path.write_text(path.read_text() + "\n# edited after the build\n")
    got = probe(root)
    assert got["running"] == "stale"
    assert set(got["files"]) >= {"sidecar.engines.http1.downstream", "sidecar.routing.inbound"}
    assert all_from_source(got), got


def test_sidecar_pure_runs_from_source_even_when_the_build_matches(tmp_path):
    root = copy_package(tmp_path)
    fake_build(root)
    got = probe(root, SIDECAR_PURE="1")
    assert got["running"] == "pure"
    assert all_from_source(got), got


def test_a_missing_or_replaced_extension_makes_the_build_stale(tmp_path):
    root = copy_package(tmp_path)
    fake_build(root)
    ext_of(root, "sidecar.routing.inbound").unlink()
    got = probe(root)
    assert got["running"] == "stale" and all_from_source(got), got
    fake_build(root)
    ext_of(root, "sidecar.engines.http1.framing").write_bytes(b"another build")
    got = probe(root)
    assert got["running"] == "stale" and all_from_source(got), got


def test_a_leftover_extension_of_a_module_no_longer_listed_is_not_loaded(tmp_path):
    root = copy_package(tmp_path)
    fake_build(root)
    (root / "sidecar" / "engines" / "http1" / "framing.py").write_text(
        (root / "sidecar" / "engines" / "http1" / "framing.py").read_text() + "\n# edited\n"
    )
    ext_of(root, "sidecar.upstream.discovery").write_bytes(b"")  # from another list
    out = run_in(root, "import sidecar.upstream.discovery as d; print(d.__file__)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("discovery.py")


def test_a_missing_or_unreadable_manifest_counts_as_stale(tmp_path):
    root = copy_package(tmp_path)
    fake_build(root)
    (root / "sidecar" / compiled.MANIFEST.name).write_text("{not json")
    got = probe(root)
    assert got["running"] == "stale" and all_from_source(got)
    (root / "sidecar" / compiled.MANIFEST.name).unlink()
    got = probe(root)
    assert got["running"] == "stale" and all_from_source(got)


@pytest.mark.skipif(
    shutil.which("cc") is None or importlib.util.find_spec("mypyc") is None,
    reason="no C compiler or no mypyc here: `make venv` leaves the request path as plain Python",
)
def test_make_venv_compiled_the_request_path():
    """`make test` runs `make venv`, which builds the request path: this checkout's
    sidecar runs it compiled (else run `make venv` after editing one of its inputs)."""
    got = probe(ROOT)
    assert got["running"] == "compiled", got
    assert got["files"] and all(not f.endswith(".py") for f in got["files"].values()), got
