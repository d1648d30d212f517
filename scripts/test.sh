#!/usr/bin/env bash
# The whole check CI runs: set-up, lint, format, types, then every test against a real broker.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo ">> ruff check" >&2
.venv/bin/ruff check .
echo ">> ruff format --check" >&2
.venv/bin/ruff format --check .
echo ">> mypy" >&2
.venv/bin/mypy
echo ">> pytest" >&2
# pytest exits 5 when it collects no tests: set -e turns that into a failure too.
.venv/bin/pytest "$@"
