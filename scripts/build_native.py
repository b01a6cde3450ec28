"""Compile the relay's hot-path modules with mypyc, and its frame gate with Cython (see
src/ghostcloak_relay/native.py).

    python scripts/build_native.py [--out DIR] [--force]

Writes the compiled modules and a stamp of the sources they came from (every module of
the package, and the interpreter) to DIR (default src/ghostcloak_relay/_native). Does
nothing when the stamp already matches.
Needs mypy (which brings mypyc), Cython, setuptools and a C compiler; exits 1 with a one-line
reason when the build fails, and the relay then runs as pure Python.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "ghostcloak_relay"
sys.path.insert(0, str(PACKAGE))
import native  # noqa: E402  (the module alone: importing the package would activate a build)


def build(out: Path, digest: str) -> None:
    """Compile into ``out`` and stamp it with ``digest``, the sources' digest taken before
    the build (so a file saved during the build leaves a stamp that does not match)."""
    from Cython.Build import cythonize
    from mypyc.build import mypycify
    from setuptools import Extension, setup

    paths = [str(PACKAGE / f"{name}.py") for name in native.MODULES]
    with tempfile.TemporaryDirectory(prefix="ghostcloak-native-") as tmp:
        stage = Path(tmp) / "lib"
        old = Path.cwd()
        os.chdir(ROOT)  # mypy reads [tool.mypy] from pyproject.toml here
        try:
            extensions = mypycify(
                paths,
                opt_level="3",
                group_name=native.GROUP,
                target_dir=str(Path(tmp) / "c"),
            )
            # against picows' C API (its picows.pxd, found on sys.path like the package)
            extensions += cythonize(
                [
                    Extension(f"{native.PACKAGE}.{name}", [str(PACKAGE / f"{name}.pyx")])
                    for name in native.CYTHON_MODULES
                ],
                build_dir=str(Path(tmp) / "cython"),
                compiler_directives={"language_level": 3},
                quiet=True,
            )
            os.chdir(tmp)  # not beside pyproject.toml: setuptools would read the project
            setup(
                name="ghostcloak-relay-native",
                ext_modules=extensions,
                script_args=[
                    "--quiet",
                    "build_ext",
                    "--build-lib",
                    str(stage),
                    "--build-temp",
                    str(Path(tmp) / "obj"),
                ],
            )
        finally:
            os.chdir(old)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(stage, out)
    (out / native.STAMP).write_text(digest + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PACKAGE / "_native")
    parser.add_argument("--force", action="store_true", help="rebuild even when current")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    stamp = out / native.STAMP
    current = native.source_digest(PACKAGE)
    if not args.force and stamp.is_file() and stamp.read_text().strip() == current:
        print(f"native: compiled modules are current ({out.relative_to(ROOT)})")
        return 0
    started = time.monotonic()
    try:
        build(out, current)
    except (Exception, SystemExit) as exc:  # setuptools reports a failed compile as SystemExit
        print(f"native: build failed, the relay runs as pure Python: {exc}", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        return 1
    if native.source_digest(PACKAGE) != current:
        print("native: sources changed during the build; run it again", file=sys.stderr)
        return 1
    took = time.monotonic() - started
    print(
        f"native: compiled {len(native.MODULES)} modules with mypyc and"
        f" {len(native.CYTHON_MODULES)} with Cython in {took:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
