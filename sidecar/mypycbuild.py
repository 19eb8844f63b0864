"""Builds the compiled request path (`sidecar.compiled.MODULES`) with mypyc, in place:
`python -m sidecar.mypycbuild [--force]` (`make venv` runs it). Needs mypy, which brings
mypyc, and a C compiler; without them it says so and the sidecar runs as plain Python."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence

from sidecar.compiled import (
    GROUP,
    MANIFEST,
    MODULES,
    ROOT,
    extensions,
    manifest,
    recorded_sources,
    source,
    state,
)


def _up_to_date(mypy_version: str) -> bool:
    try:
        built = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return False
    return state() == "compiled" and built.get("mypy") == mypy_version


def _remove_build() -> None:
    MANIFEST.unlink(missing_ok=True)
    for old in extensions():
        old.unlink()


def build(*, force: bool = False) -> int:
    """Compile `MODULES` in place; nothing to do when the build matches its inputs and this
    mypy. A failure removes any partial build (the sidecar then runs as plain Python) and
    is reported, not raised: `make venv` goes on."""
    try:
        from mypy.version import __version__ as mypy_version  # noqa: PLC0415 (build only)
        from mypyc.build import mypycify  # noqa: PLC0415
        from setuptools import Distribution  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError as e:
        print(
            f"sidecar: not compiling the request path ({e.name} is not installed); "
            "it runs as plain Python"
        )
        return 0
    if not force and _up_to_date(mypy_version):
        print("sidecar: the compiled request path is up to date")
        return 0
    if os.environ.get("SIDECAR_PURE", "") not in ("", "0"):
        print("sidecar: SIDECAR_PURE is set: not compiling the request path")
        return 0
    _remove_build()
    sources = recorded_sources()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="sidecar-mypyc-") as tmp:
        try:
            os.chdir(ROOT)  # mypyc names modules by their path from here
            paths = [str(source(m).relative_to(ROOT)) for m in MODULES]
            exts = mypycify(
                [*paths, "--config-file", "pyproject.toml"],
                group_name=GROUP,
                target_dir=os.path.join(tmp, "c"),
            )
            dist = Distribution({"name": "sidecar-hot", "ext_modules": exts})
            dist.script_name = "sidecar.mypycbuild"
            dist.script_args = ["-q", "build_ext", "--inplace", "--build-temp", tmp]
            dist.parse_command_line()
            dist.run_commands()
        except (Exception, SystemExit) as e:  # no compiler, or a module mypyc refuses
            _remove_build()
            print(f"sidecar: compiling the request path failed ({e}); it runs as plain Python")
            return 0
        finally:
            os.chdir(cwd)
    MANIFEST.write_text(json.dumps(manifest(sources, extensions(), mypy_version), indent=1))
    if state() != "compiled":  # a source changed while it compiled: not trusted
        print("sidecar: a source changed during the build; run it again (plain Python now)")
        return 0
    print(f"sidecar: compiled {len(MODULES)} modules of the request path")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sidecar.mypycbuild [--force]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["--force"]):
        print("usage: python -m sidecar.mypycbuild [--force]", file=sys.stderr)
        return 2
    return build(force=bool(args))


if __name__ == "__main__":
    raise SystemExit(main())
