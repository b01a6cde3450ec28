#!/usr/bin/env bash
# Install the real-node test harness (tier 3 of ../shared/DESIGN.md: chopsticks serving a real
# Substrate runtime, and the Node clients that drive it) into .realnode/.
#
#   scripts/setup-realnode.sh
#
# The versions are pinned in tests/realnode/js/package.json, which this script
# copies into .realnode/ (git-ignored) before `npm install` there. A stamp file
# records the sha256 of the package.json that was installed, so a second run
# with the same package.json does nothing. `--ignore-scripts` skips the
# sqlite3 native build that chopsticks only needs for `--db`.
#
# Without node/npm this prints why and exits 0: the real-node tests then skip,
# or fail when RELAY_REQUIRE_REAL_NODE=1 (as CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

SRC=tests/realnode/js/package.json
DEST="${REALNODE_DIR:-.realnode}"
STAMP="$DEST/.installed-package-json.sha256"
CHOPSTICKS="$DEST/node_modules/@acala-network/chopsticks/chopsticks.cjs"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "setup-realnode: node and npm are needed for the real-node tests and were not found;" \
       "skipping (install Node.js 20+ with npm, then run this again)" >&2
  exit 0
fi

want="$(sha256sum "$SRC" | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -f "$CHOPSTICKS" ]; then
  exit 0
fi

echo "setup-realnode: installing $SRC into $DEST/ (node $(node --version), npm $(npm --version))"
mkdir -p "$DEST"
rm -f "$STAMP"
cp "$SRC" "$DEST/package.json"
# chopsticks 1.5.1 declares node >=22 but runs on Node 20: its EBADENGINE
# warnings are expected there and filtered out to keep the output readable.
(cd "$DEST" && npm install --ignore-scripts --no-audit --no-fund --loglevel=error)
[ -f "$CHOPSTICKS" ] || { echo "setup-realnode: $CHOPSTICKS missing after npm install" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup-realnode: done"
