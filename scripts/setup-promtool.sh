#!/usr/bin/env bash
# Fetch promtool (from Debian's prometheus package) into .tools/ for the alert-rules check
# in tests/test_deploy.py. The package is downloaded and unpacked, never installed: no
# Prometheus service, user or configuration appears on the machine. Idempotent and quiet:
# does nothing when promtool is on PATH or already unpacked. Where apt-get cannot fetch it,
# it says so and exits 0: the promtool check then skips, unless RELAY_REQUIRE_PROMTOOL=1
# (CI) fails it.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.tools/prometheus
if command -v promtool >/dev/null 2>&1 || [ -x "$dest/usr/bin/promtool" ]; then
  exit 0
fi
say() { echo "setup-promtool: $*" >&2; }
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  say "apt-get/dpkg-deb not found; put promtool on PATH yourself (the promtool check will skip)"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
say "fetching Debian's prometheus package for promtool"
fetch() { (cd "$work" && apt-get download -qq prometheus) >"$work/log" 2>&1; }
if ! fetch; then
  # the package lists may be missing on a fresh machine: refresh them when allowed
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq >"$work/log" 2>&1 || true
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo -n apt-get update -qq >"$work/log" 2>&1 || true
  fi
  if ! fetch; then
    cat "$work/log" >&2
    say "could not download the prometheus package (the promtool check will skip)"
    exit 0
  fi
fi
mkdir -p "$dest"
if ! dpkg-deb -x "$work"/prometheus_*.deb "$dest" 2>"$work/log"; then
  cat "$work/log" >&2
  rm -rf "$dest"
  say "could not unpack the prometheus package (the promtool check will skip)"
  exit 0
fi
say "$("$dest/usr/bin/promtool" --version 2>&1 | head -n 1)"
