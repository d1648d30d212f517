#!/usr/bin/env bash
# Set up this checkout on a fresh Debian/Ubuntu machine; safe to run again.
#  - installs Mosquitto (broker + clients) and jq with apt when they are missing
#  - creates .venv with the interpreter in $PYTHON (default python3, >= 3.10)
#  - installs this project editable with every extra (agent, trainer, dev)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

have_mosquitto() {
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]
}
have_clients() {
  command -v mosquitto_sub >/dev/null 2>&1 || [ -x /usr/bin/mosquitto_sub ]
}
have_jq() {
  command -v jq >/dev/null 2>&1
}
if ! have_mosquitto || ! have_clients || ! have_jq; then
  echo ">> installing mosquitto, mosquitto-clients and jq with apt" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y mosquitto mosquitto-clients jq
fi

if [ ! -x .venv/bin/python ]; then
  echo ">> creating .venv with $PYTHON" >&2
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[agent,trainer,dev]'
echo ">> ready: .venv/bin/har --help" >&2
