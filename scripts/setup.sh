#!/usr/bin/env bash
# Set up this checkout on a fresh Debian/Ubuntu machine; safe to run again.
#  - installs Mosquitto (broker + clients) and jq with apt when they are missing
#  - installs PostgreSQL (the server binaries the tests start, initdb and postgres) with apt when
#    they are missing; Debian keeps them off PATH, in /usr/lib/postgresql/<version>/bin
#  - creates .venv with the interpreter in $PYTHON (default python3, >= 3.10)
#  - installs this project editable with every extra (agent, agent-lite, trainer, postgres, dev),
#    again only when pyproject.toml changed since (a hash of it is kept in .venv)
#  - does the same in .venv-lite with the light agent's extra only (agent-lite: no TensorFlow)
#  - unpacks promtool from Debian's prometheus package into .venv/prometheus (not installed)
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
  had_mosquitto=$(have_mosquitto && echo yes || echo no)
  echo ">> installing mosquitto, mosquitto-clients and jq with apt" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y mosquitto mosquitto-clients jq
  # Debian's package enables and starts a system-wide broker: say so, rather than leave it unsaid.
  if [ "$had_mosquitto" = no ] && command -v systemctl >/dev/null 2>&1 \
    && systemctl is-active --quiet mosquitto 2>/dev/null; then
    echo ">> note: the mosquitto package also started a system-wide broker on port 1883" \
      "(service mosquitto, started at every boot). The demo and the tests run brokers of" \
      "their own on free ports and do not need it. To stop and disable it:" \
      "${SUDO:+$SUDO }systemctl disable --now mosquitto" >&2
  fi
fi

# initdb and postgres: on PATH, where `pg_config --bindir` says, or in Debian's versioned folder
# (the same search as har/local_postgres.py). The package's own cluster service is not needed:
# the tests run servers of their own.
have_postgres() {
  command -v initdb >/dev/null 2>&1 && return 0
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
    return 0
  fi
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
if ! have_postgres; then
  echo ">> installing postgresql with apt (the tests start throwaway servers of their own)" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y postgresql
fi

# install_into VENV EXTRAS: make VENV if it is missing, and install this project editable with
# EXTRAS into it only when the venv is new or pyproject.toml changed since the last install: an
# editable install takes seconds and prints setuptools' warning box every time. The stamp holds
# the pyproject.toml hash it was made with, and is written only after the install succeeded.
install_into() {
  local venv=$1 extras=$2
  local stamp=$venv/.har-installed-pyproject.sha256
  if [ ! -x "$venv/bin/python" ]; then
    echo ">> creating $venv with $PYTHON" >&2
    "$PYTHON" -m venv "$venv"
    rm -f "$stamp" # a stamp left in a half-made venv says nothing about the new one
  fi
  local wanted
  wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo ">> installing this project into $venv (pyproject.toml is new or changed)" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e ".[$extras]"
    echo "$wanted" >"$stamp"
  fi
}
install_into .venv agent,agent-lite,trainer,postgres,dev
# The light agent's environment, without TensorFlow: what a wearable installs (deploy/README.md).
# The tests run the agent from it, which proves the light agent never needs TensorFlow.
install_into .venv-lite agent-lite

# promtool, from Debian's prometheus package: tests/test_grafana_prometheus.py has Prometheus
# evaluate the Grafana dashboard's expressions with it. Only the binary is unpacked into .venv:
# installing the package would also start a Prometheus server listening on every interface.
PROMTOOL=.venv/prometheus/bin/promtool
if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$PROMTOOL" ]; then
  echo ">> unpacking promtool from Debian's prometheus package into $(dirname "$PROMTOOL")" >&2
  scratch=$(mktemp -d)
  if (cd "$scratch" && apt-get download prometheus >/dev/null 2>&1) \
    && dpkg-deb -x "$scratch"/prometheus_*.deb "$scratch/unpacked"; then
    install -D -m 0755 "$scratch/unpacked/usr/bin/promtool" "$PROMTOOL"
  else
    echo ">> note: could not download the prometheus package (apt-get download prometheus);" \
      "the dashboard expression tests will be skipped, saying so" >&2
  fi
  rm -rf "$scratch"
fi
echo ">> ready: .venv/bin/har --help" >&2
