#!/usr/bin/env bash
# Install Node-RED and node-red-dashboard into .venv/node-red, for the test that imports
# docs/node-red-flow.json into a real Node-RED (tests/test_node_red_flow.py); that test is skipped
# without them. Needs Node.js and npm (Node-RED 4.1 runs on Node.js 18 or later; 5.x needs 22.9).
# Safe to run again: it installs only what is missing. About 15 s from the npm registry.
set -euo pipefail
cd "$(dirname "$0")/.."

NODE_RED_VERSION=4.1.8
DASHBOARD_VERSION=3.6.6
prefix=.venv/node-red

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo ">> no node/npm: not installing Node-RED (its flow test will be skipped)" >&2
  exit 0
fi
installed() {
  [ -x "$prefix/node_modules/.bin/node-red" ] &&
    grep -q "\"version\": \"$NODE_RED_VERSION\"" "$prefix/node_modules/node-red/package.json" &&
    grep -q "\"version\": \"$DASHBOARD_VERSION\"" "$prefix/node_modules/node-red-dashboard/package.json"
}
if installed 2>/dev/null; then
  exit 0
fi
echo ">> installing node-red@$NODE_RED_VERSION and node-red-dashboard@$DASHBOARD_VERSION into $prefix" >&2
mkdir -p "$prefix"
npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error \
  "node-red@$NODE_RED_VERSION" "node-red-dashboard@$DASHBOARD_VERSION" >&2
