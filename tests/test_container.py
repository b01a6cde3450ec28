"""The Dockerfile, exercised without a Docker engine (none runs on these machines).

The test reads the Dockerfile, checks what a production image needs (slim Python base,
non-root user, EXPOSE 8443, HEALTHCHECK on /health, default command), then runs its
install step in a clean virtual environment with the same paths swapped for temporary
ones, starts the default command, runs the HEALTHCHECK command, and stops the relay with
the image's STOPSIGNAL. The install step is the build stage's (it compiles the data
plane); the run stage only copies that virtual environment into the slim image of the
same Python and Debian release, which this test cannot reproduce without an engine (a
compiled library that did not load there would make the relay run as pure Python).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, free_port

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_production_shaped() -> None:
    ins = instructions()
    kinds = [k for k, _ in ins]
    froms = [v for k, v in ins if k == "FROM"]
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", froms[-1])  # the image itself
    # a build stage must match the image's Python and Debian release (compiled modules)
    for stage in froms[:-1]:
        image = stage.split()[0]
        assert image == froms[-1].replace("-slim", ""), (image, froms[-1])
    user = [v for k, v in ins if k == "USER"]
    assert user
    assert user[-1] not in ("root", "0")
    assert ("EXPOSE", "8443") in ins
    assert "HEALTHCHECK" in kinds
    assert json.loads(dict(ins)["CMD"]) == ["ghostcloak-relay", "serve"]
    assert kinds.index("USER") < kinds.index("CMD")
    ignore = (ROOT / ".dockerignore").read_text().split()
    for secret_or_bulk in (".git", ".venv", "*.pem", "*.key", "tests"):
        assert secret_or_bulk in ignore


@pytest.mark.slow
def test_install_and_start_steps_in_a_clean_venv(tmp_path: Path) -> None:
    ins = instructions()
    app, venv = tmp_path / "app", tmp_path / "opt-relay"
    app.mkdir()
    for kind, args in ins:  # COPY src dst (relative to WORKDIR /app)
        if kind == "COPY" and not args.startswith("--from="):  # the build stage's venv
            *sources, dest = args.split()
            for src in sources:
                target = app / dest if dest not in ("./", ".") else app
                if (ROOT / src).is_dir():
                    shutil.copytree(
                        ROOT / src,
                        target,
                        ignore=shutil.ignore_patterns("__pycache__", "_native"),
                    )
                else:
                    target = app / dest if dest.endswith("/") and dest != "./" else app
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(ROOT / src, target)
    install = [v for k, v in ins if k == "RUN" and "pip install" in v]
    assert len(install) == 1
    cmd = install[0].replace("/opt/relay", str(venv)).replace("/app", str(app))
    cmd = cmd.replace("python -m venv", f"{shlex.quote(sys.executable)} -m venv")
    subprocess.run(
        ["bash", "-c", cmd],
        check=True,
        timeout=600,
        cwd=app,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )

    # a wheel with the compiled modules says which interpreter and platform it is for
    (wheel_info,) = venv.glob("lib/python*/site-packages/ghostcloak_relay-*.dist-info/WHEEL")
    fields = [tuple(line.split(": ", 1)) for line in wheel_info.read_text().splitlines() if line]
    tags = [value for key, value in fields if key == "Tag"]
    if os.environ.get("RELAY_REQUIRE_NATIVE") == "1":
        python = f"cp{sys.version_info[0]}{sys.version_info[1]}"
        assert tags, fields
        assert all(tag.startswith(f"{python}-{python}-") for tag in tags), fields
        assert ("Root-Is-Purelib", "false") in fields

    env_vars = dict(re.findall(r"(\w+)=(\S+)", " ".join(v for k, v in ins if k == "ENV")))
    port = free_port()
    env = {
        "PATH": f"{venv}/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        **{k: v for k, v in env_vars.items() if k != "PATH"},
        "PORT": str(port),
        "RELAY_HOST": "127.0.0.1",
    }
    health_cmd = json.loads(dict(ins)["HEALTHCHECK"].split(" CMD ", 1)[1])
    stopsignal = getattr(signal, dict(ins).get("STOPSIGNAL", "SIGTERM"))
    proc = subprocess.Popen(
        json.loads(dict(ins)["CMD"]),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            probe = subprocess.run(health_cmd, env=env, cwd=tmp_path, timeout=10)
            if probe.returncode == 0:
                break
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "HEALTHCHECK never passed"
            time.sleep(0.2)
        proc.send_signal(stopsignal)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        # the image's install step compiled the data plane (it has the compiler for it)
        if os.environ.get("RELAY_REQUIRE_NATIVE") == "1":
            assert "compiled data plane" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    # and the health check fails once the relay is gone
    assert subprocess.run(health_cmd, env=env, cwd=tmp_path, timeout=10).returncode == 1
