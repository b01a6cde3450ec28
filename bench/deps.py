"""What the benchmark needs beyond the relay's own dependencies, installed on demand.

* nginx, the reference proxy, from Debian's packages (``nginx-light``, else ``nginx``),
  only when no ``nginx`` binary is found. Debian's ``policy-rc.d`` (present in our
  containers) keeps the packaged service from starting; the benchmark runs its own
  nginx from a generated configuration.
* Python packages into the running interpreter's environment with pip: ``matplotlib``
  (the latency chart), ``tqdm`` (progress bar) and, for ``--profile``, ``py-spy``.

Each function is idempotent and returns what it had to install, so the report can say
which packages were added (and should go into a project extra).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = [
    "DepsError",
    "ensure_nginx",
    "ensure_pyspy",
    "ensure_python",
    "nginx_binary",
    "pyspy_binary",
]

APT_TIMEOUT = 900.0
PIP_TIMEOUT = 600.0


class DepsError(RuntimeError):
    """A dependency is missing and could not be installed."""


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _apt(*args: str) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            ["apt-get", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=APT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def ensure_nginx() -> tuple[str, list[str]]:
    """Return the nginx binary, installing Debian's package if there is none."""
    found = nginx_binary()
    if found:
        return found, []
    if shutil.which("apt-get") is None:
        raise DepsError("nginx is not installed and apt-get is not available: install nginx")
    if os.geteuid() != 0:
        raise DepsError("nginx is not installed: run `apt-get install -y nginx-light` as root")
    for package in ("nginx-light", "nginx"):
        for attempt in range(2):
            if attempt and not _apt("update", "-q"):
                break
            if _apt("install", "-y", "-q", "--no-install-recommends", package):
                found = nginx_binary()
                if found:
                    return found, [f"apt:{package}"]
    raise DepsError("could not install nginx (tried nginx-light and nginx with apt-get)")


def ensure_python(modules: dict[str, str]) -> list[str]:
    """Install each missing ``{module: pip requirement}`` with pip; return the installed."""
    missing = [req for mod, req in modules.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return []
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *missing]
    try:
        done = subprocess.run(cmd, timeout=PIP_TIMEOUT, check=False, capture_output=True)
    except subprocess.TimeoutExpired as exc:
        raise DepsError(f"pip install {' '.join(missing)} timed out") from exc
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise DepsError(f"pip install {' '.join(missing)} failed: {' / '.join(tail)}")
    importlib.invalidate_caches()
    return [f"pip:{req}" for req in missing]


def pyspy_binary() -> str | None:
    """py-spy next to the interpreter (installed into the venv), else on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def ensure_pyspy() -> list[str]:
    """Install py-spy (a binary, not an importable module) with pip if it is missing."""
    if pyspy_binary() is not None:
        return []
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "py-spy"]
    try:
        done = subprocess.run(cmd, timeout=PIP_TIMEOUT, check=False, capture_output=True)
    except subprocess.TimeoutExpired as exc:
        raise DepsError("pip install py-spy timed out") from exc
    if done.returncode != 0 or pyspy_binary() is None:
        raise DepsError("pip install py-spy failed")
    return ["pip:py-spy"]
