#!/usr/bin/env bash
# Install HAProxy (Debian's package) for tests/test_cluster.py and the haproxy.cfg check
# in tests/test_deploy.py. Idempotent and quiet: does nothing when `haproxy` is already on
# PATH. Where apt-get is unavailable (not Debian, or not root without sudo) it says so and
# exits 0: the HAProxy tests then skip, unless RELAY_REQUIRE_HAPROXY=1 (CI) fails them.
# The tests run their own HAProxy in the foreground; no system service is configured.
set -euo pipefail
if command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; then
  exit 0
fi
say() { echo "setup-haproxy: $*" >&2; }
if ! command -v apt-get >/dev/null 2>&1; then
  say "apt-get not found; install HAProxy yourself (the HAProxy tests will skip)"
  exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    say "not root and no password-less sudo; install Debian's 'haproxy' package yourself" \
      "(the HAProxy tests will skip)"
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
say "installing Debian's haproxy package"
if ! { "${sudo[@]}" apt-get update -qq \
  && "${sudo[@]}" apt-get install -y -qq --no-install-recommends haproxy; } >"$log" 2>&1; then
  cat "$log" >&2
  say "apt-get could not install haproxy (the HAProxy tests will skip)"
  exit 0
fi
say "$(PATH="$PATH:/usr/sbin" haproxy -v | head -n 1)"
