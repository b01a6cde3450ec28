"""The compiled data plane: the hot-path modules built with mypyc, used only when current.

Profiling the relay under load (``bench/``) shows its user-space CPU is mostly the
CPython interpreter running the per-message path. mypyc compiles that same typed source
to C, with no second implementation to keep in step: the modules in :data:`MODULES` are
built by ``scripts/build_native.py`` (which ``scripts/setup.sh`` runs) into
``_native/`` inside this package, together with a digest of what they were built from:
every module of the package (compiled code relies on the declared types of the others
too, such as ``Settings``) and the interpreter and extension ABI they are for.

:func:`activate` (called by the package ``__init__``) puts the compiled modules first on
the package's search path only when that digest matches the ``.py`` files beside them
and their shared library imports; otherwise, or with ``RELAY_PURE_PYTHON=1``, the plain
Python modules are imported and behave the same, at a higher CPU cost per message. A
source edited after the build is therefore never run as stale compiled code.

The picows listeners (subclasses of its Cython ``WSListener``) are marked
``@mypyc_attr(native_class=False)``: as native classes mypyc would lay its own C struct
over the base's, and picows calls them through the base's C vtable (a crash). Their
methods are compiled all the same; only their attributes stay in a ``__dict__``. Their
common base, the frame gate (:data:`CYTHON_MODULES`, ``frame_gate.py``), is built with
Cython against picows' C API instead, so the common frame never enters the interpreter
between picows and the compiled code. It is compiled against picows' binary layout, so
the build tag includes picows' version: a different picows means pure Python until the
next build.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import sys
import sysconfig
from pathlib import Path

__all__ = ["CYTHON_MODULES", "MODULES", "NATIVE_DIR", "activate", "build_tag", "source_digest"]

#: The per-message path: framing, envelopes, policy, sessions, counters.
MODULES = (
    "connection",
    "frames",
    "limits",
    "policy",
    "protocol",
    "relay_connection",
    "rpc",
    "rpc_connection",
    "session",
    "stats",
    "upstream",
)

#: Built with Cython (a ``.pyx`` beside the ``.py`` of the same name), used with the above.
CYTHON_MODULES = ("frame_gate",)

PACKAGE = "ghostcloak_relay"
PACKAGE_DIR = Path(__file__).resolve().parent
NATIVE_DIR = PACKAGE_DIR / "_native"
STAMP = "SOURCES"
#: mypyc puts the code of all modules in one shared library, a top-level module that the
#: per-module stubs import (its name follows ``group_name`` in scripts/build_native.py).
GROUP = "ghostcloak_relay_native"
SHARED_LIBRARY = f"{GROUP}__mypyc"


def build_tag() -> str:
    """What a build is only valid for: this interpreter's version, platform and ABI."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ""
    try:
        picows = importlib.metadata.version("picows")
    except importlib.metadata.PackageNotFoundError:
        picows = "none"
    return f"{sys.implementation.cache_tag}-{sys.platform}-{sys.abiflags}-{suffix}-picows{picows}"


def source_digest(package_dir: Path = PACKAGE_DIR) -> str:
    """Digest of every module of the package and the build tag (the stamp's content)."""
    digest = hashlib.sha256(build_tag().encode())
    for path in sorted([*package_dir.glob("*.py"), *package_dir.glob("*.pyx")]):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def activate(package_path: list[str]) -> bool:
    """Prefer the compiled modules when present and current; True when they are used.

    ``package_path`` is the package's ``__path__``; must run before any of
    :data:`MODULES` is imported.
    """
    if os.environ.get("RELAY_PURE_PYTHON", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        built_from = (NATIVE_DIR / STAMP).read_text().strip()
        current = source_digest()
    except OSError:
        return False
    if built_from != current:
        return False
    added = str(NATIVE_DIR) not in sys.path
    if added:
        sys.path.append(str(NATIVE_DIR))
    package_path.insert(0, str(NATIVE_DIR / PACKAGE))
    try:  # a library that cannot load here (built against another libc, say): pure Python
        importlib.import_module(SHARED_LIBRARY)
        for name in CYTHON_MODULES:
            importlib.import_module(f"{PACKAGE}.{name}")
    except ImportError:
        package_path.remove(str(NATIVE_DIR / PACKAGE))
        for name in CYTHON_MODULES:
            sys.modules.pop(f"{PACKAGE}.{name}", None)
        if added:
            sys.path.remove(str(NATIVE_DIR))
        return False
    return True
