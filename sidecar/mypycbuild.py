"""Builds the compiled request path (`sidecar.compiled.MODULES`) with mypyc, in place:
`python -m sidecar.mypycbuild [--force]` (`make venv` runs it). Needs mypy, which brings
mypyc, and a C compiler; without them it says so and the sidecar runs as plain Python."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from sidecar.compiled import _ROOT, GROUP, MANIFEST, MODULES, _digest, _extensions, source


def build(*, force: bool = False) -> int:
    """Compile `MODULES` in place (needs mypy, which brings mypyc, and a C compiler).
    Nothing is done when the manifest already matches the sources."""
    if not force and MANIFEST.exists() and _manifest_matches():
        print("sidecar: the compiled request path is up to date")
        return 0
    try:
        from mypyc.build import mypycify  # noqa: PLC0415 (build time only)
        from setuptools import Distribution  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError as e:
        print(
            f"sidecar: not compiling the request path ({e.name} is not installed); "
            "it runs as plain Python"
        )
        return 0
    import tempfile  # noqa: PLC0415

    for old in _extensions():
        old.unlink()
    MANIFEST.unlink(missing_ok=True)
    digests = {m: _digest(source(m)) for m in MODULES}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="sidecar-mypyc-") as tmp:
        try:
            os.chdir(_ROOT)  # mypyc names modules by their path from here
            paths = [str(source(m).relative_to(_ROOT)) for m in MODULES]
            exts = mypycify(
                [*paths, "--config-file", "pyproject.toml"],
                group_name=GROUP,
                target_dir=os.path.join(tmp, "c"),
            )
            dist = Distribution({"name": "sidecar-hot", "ext_modules": exts})
            dist.script_name = "sidecar.compiled"
            dist.script_args = ["-q", "build_ext", "--inplace", "--build-temp", tmp]
            dist.parse_command_line()
            dist.run_commands()
        except (Exception, SystemExit) as e:  # no compiler, or a module mypyc refuses
            for old in _extensions():
                old.unlink()
            print(f"sidecar: compiling the request path failed ({e}); it runs as plain Python")
            return 0
        finally:
            os.chdir(cwd)
    MANIFEST.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print(f"sidecar: compiled {len(MODULES)} modules of the request path")
    return 0


def _manifest_matches() -> bool:
    try:
        built = json.loads(MANIFEST.read_text())
        return built == {m: _digest(source(m)) for m in MODULES} and bool(_extensions())
    except (OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sidecar.mypycbuild [--force]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["--force"]):
        print("usage: python -m sidecar.mypycbuild [--force]", file=sys.stderr)
        return 2
    return build(force=bool(args))


if __name__ == "__main__":
    raise SystemExit(main())
