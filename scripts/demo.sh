#!/usr/bin/env bash
# Set up, then run the full-loop demo: Mosquitto with the production config (passwords, ACL,
# TLS), the trainer, three device agents, simulated people confirming predictions, one retrain,
# and a summary (var/demo/summary.json). Flags go to `har demo` (see `har demo --help`), e.g.
# --data FILE for a WISDM-format file. Ctrl-C stops every process it started.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
exec .venv/bin/har demo "$@"
