#!/usr/bin/env bash
# The whole check CI runs: set-up, lint, format, types, then every test against a real broker.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# Node-RED for the test that runs docs/node-red-flow.json (about 15 s once, kept in .venv). A
# registry that cannot be reached is not a failure of this project: that test is then skipped,
# and pytest's summary says why.
scripts/install-node-red.sh || echo ">> warning: Node-RED not installed; its flow test will be skipped" >&2
echo ">> ruff check" >&2
.venv/bin/ruff check .
echo ">> ruff format --check" >&2
.venv/bin/ruff format --check .
echo ">> mypy" >&2
.venv/bin/mypy
echo ">> pytest" >&2
# pytest exits 5 when it collects no tests: set -e turns that into a failure too.
.venv/bin/pytest "$@"
