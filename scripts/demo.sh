#!/usr/bin/env bash
# Set up, then run the full-loop demo: broker, trainer, a device agent, confirmations, a retrain.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
exec .venv/bin/har demo "$@"
