"""Wheel build hook: a wheel that carries the compiled data plane is tagged for this
interpreter and platform (``cp312-cp312-linux_x86_64``), not ``py3-none-any``.

``scripts/build_native.py`` builds ``src/ghostcloak_relay/_native/`` (C extensions for one
interpreter, ABI and libc); hatch ships it as an artifact. Without this hook the wheel
would claim to fit any Python anywhere. A wheel built without the compiled modules stays
pure Python (``py3-none-any``), which it then is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):  # type: ignore[misc]  (hatchling: the build env only)
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if (Path(self.root) / "src" / "ghostcloak_relay" / "_native" / "SOURCES").is_file():
            build_data["pure_python"] = False
            build_data["infer_tag"] = True
