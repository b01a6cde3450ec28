#!/usr/bin/env bash
# Create the project's virtual environment and install the relay into it.
#   scripts/setup.sh        runtime only (the demo)
#   scripts/setup.sh test   runtime plus test and lint tools
# Then compiles the data plane with mypyc and Cython (scripts/build_native.py; skipped while current,
# and with RELAY_PURE_PYTHON=1). Without a C compiler the relay runs as pure Python,
# unless RELAY_REQUIRE_NATIVE=1 (.ci/run), which makes a failed build fail the setup.
# Idempotent: reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
extra="${1:-}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup: Python 3.11 or newer is needed ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-${extra:-runtime}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing ghostcloak-relay${extra:+ [$extra]} into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  if [ -n "$extra" ]; then spec=".[$extra,native]"; else spec=".[native]"; fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec"
  touch "$stamp"
fi
if [ "${RELAY_PURE_PYTHON:-0}" != 1 ]; then
  if ! "$VENV/bin/python" scripts/build_native.py; then
    if [ "${RELAY_REQUIRE_NATIVE:-0}" = 1 ]; then
      echo "setup: RELAY_REQUIRE_NATIVE=1 and the compiled build failed" >&2
      exit 1
    fi
    echo "setup: continuing with the pure-Python relay (slower, same behaviour)" >&2
  fi
fi
