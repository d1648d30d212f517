#!/usr/bin/env bash
# Certificates for the broker's TLS listener (deploy/mosquitto/mosquitto.conf, port 8883):
# a private CA, a server certificate for the names and addresses devices use to reach the broker,
# and optionally client certificates. Needs openssl >= 1.1.1. Keys are ECDSA P-256.
set -euo pipefail
# Byte-wise character ranges in the checks below, whatever the caller's locale.
export LC_ALL=C

usage() {
    cat <<'EOF'
Usage: deploy/make-certs.sh [--out DIR] [--days N] [--client NAME]... HOST_OR_IP...

Writes into DIR (default: ./certs):
  ca.key, ca.crt          a private CA. Made once and reused on later runs, so re-running to
                          renew the server certificate or add clients keeps every device's
                          ca.crt valid. Keep ca.key offline once you have what you need.
  server.key, server.crt  for mosquitto: subjectAltNames = every HOST_OR_IP given (at least one;
                          addresses become IP entries, the rest DNS entries). Clients check the
                          name they connect to against these, so list every name and address
                          devices use, e.g. broker.example.lan 10.0.0.5.
  NAME.key, NAME.crt      per --client NAME: a client certificate with CN = NAME (for
                          require_certificate / use_identity_as_username: NAME = device id).

Options:
  --out DIR      output folder (created, mode 0750)
  --days N       validity of the server and client certificates (default 825; the CA: 3650)
  --client NAME  also make a client certificate; repeatable
  -h, --help     this text

Then (docker compose, deploy/README.md section 3):
  sudo install -d -m 0750 -g 1883 /etc/har/mosquitto/certs
  sudo install -m 0644 DIR/ca.crt DIR/server.crt /etc/har/mosquitto/certs/
  sudo install -m 0640 -g 1883 DIR/server.key /etc/har/mosquitto/certs/
and give each device DIR/ca.crt as broker.ca_file.
EOF
}

die() {
    echo "make-certs.sh: $*" >&2
    exit 2
}

out_dir="./certs"
days=825
clients=()
names=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) [[ $# -ge 2 ]] || die "--out needs a folder"; out_dir="$2"; shift 2 ;;
        --days) [[ $# -ge 2 ]] || die "--days needs a number"; days="$2"; shift 2 ;;
        --client) [[ $# -ge 2 ]] || die "--client needs a name"; clients+=("$2"); shift 2 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) names+=("$1"); shift ;;
    esac
done
[[ ${#names[@]} -ge 1 ]] || die "give at least one host name or IP address of the broker (see --help)"
[[ "$days" =~ ^[1-9][0-9]{0,4}$ ]] || die "--days must be a whole number of days, got '$days'"
command -v openssl >/dev/null || die "openssl is not installed"

# Host names, IPv4 and IPv6 addresses only: anything else would end up in the openssl config.
san=""
for name in "${names[@]}"; do
    if [[ "$name" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ || "$name" =~ ^[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*$ ]]; then
        entry="IP:$name"
    elif [[ "$name" =~ ^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$ ]]; then
        entry="DNS:$name"
    else
        die "'$name' is neither a host name nor an IP address"
    fi
    san="${san:+$san,}$entry"
done
for client in "${clients[@]+"${clients[@]}"}"; do
    # The same alphabet as device ids (shared.topics.is_valid_id): it becomes a file name and a CN.
    [[ "$client" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] \
        || die "client name '$client': use 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
done

umask 077
mkdir -p "$out_dir"
chmod 0750 "$out_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

new_key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

# A random 127-bit serial: unique without a serial file to keep.
serial() {
    echo "0x$(openssl rand -hex 16 | sed 's/^./7/')"
}

# Sign $1.csr (made from $1.key) with the CA, with the v3 extensions in $2, as $1.crt.
sign() {
    local base="$1" extensions="$2" csr="$work/request.csr"
    openssl req -new -key "$out_dir/$base.key" -subj "/CN=$3" -out "$csr"
    openssl x509 -req -in "$csr" -CA "$out_dir/ca.crt" -CAkey "$out_dir/ca.key" \
        -set_serial "$(serial)" -days "$days" -sha256 -extfile "$extensions" \
        -out "$out_dir/$base.crt" 2>/dev/null
    chmod 0644 "$out_dir/$base.crt"
}

if [[ -f "$out_dir/ca.key" && -f "$out_dir/ca.crt" ]]; then
    echo "reusing the CA in $out_dir (ca.key, ca.crt)"
else
    new_key "$out_dir/ca.key"
    cat >"$work/ca.cnf" <<'EOF'
[req]
distinguished_name = dn
x509_extensions = ca_ext
prompt = no
[dn]
CN = HAR MQTT CA
[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
    openssl req -x509 -new -config "$work/ca.cnf" -key "$out_dir/ca.key" -sha256 -days 3650 \
        -set_serial "$(serial)" -out "$out_dir/ca.crt"
    chmod 0644 "$out_dir/ca.crt"
    echo "new CA: $out_dir/ca.crt (its key $out_dir/ca.key signs every certificate: keep it safe)"
fi

cat >"$work/server.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
new_key "$out_dir/server.key"
# mosquitto reads it as uid 1883 in the container: the install step gives it that group.
chmod 0640 "$out_dir/server.key"
sign server "$work/server.ext" "${names[0]}"
echo "server certificate: $out_dir/server.crt for $san"

cat >"$work/client.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
for client in "${clients[@]+"${clients[@]}"}"; do
    new_key "$out_dir/$client.key"
    sign "$client" "$work/client.ext" "$client"
    echo "client certificate: $out_dir/$client.crt (CN=$client)"
done
