#!/usr/bin/env bash
# Add a device to the broker: a random password in the Mosquitto password file, and a
# provisioning folder (agent.toml, broker.password) to copy onto the device.
set -euo pipefail
# Byte-wise character ranges in the checks below, whatever the caller's locale.
export LC_ALL=C

usage() {
    cat <<'EOF'
Usage: deploy/add-device.sh [options] [--] DEVICE_ID

Adds DEVICE_ID as a broker user with a random password (mosquitto_passwd -b) and writes a
provisioning folder for the device:
  agent.toml        deploy/agent.example.toml with device_id and broker.username = DEVICE_ID
  broker.password   the password (mode 0600)
  ca.crt, model-signing.pub   when --ca-file / --public-key are given
Install them on the device as /etc/har/... (deploy/README.md section 2).

The ACL needs no line for a new device: its patterns (%u = the username) let every user publish
only under har/v1/devices/<its username>/ and homeassistant/{sensor,select,button}/<its
username>/, so the username must be the device id. That is why this script refuses an id
outside the device-id alphabet (1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit) and
the broker's own logins in deploy/mosquitto/logins (in any letter case; listed below), whose
users would then also get a device's rights or lend theirs to it.

Options:
  --passwd FILE         the broker's password file; must exist (default: $HAR_MOSQUITTO_PASSWD,
                        else /etc/har/mosquitto/passwd)
  --out DIR             the provisioning folder; must not exist (default: ./provision/DEVICE_ID)
  --broker-host HOST    written as broker.host into agent.toml
  --ca-file FILE        the CA of the broker's TLS certificate, copied as ca.crt
  --public-key FILE     the trainer's model-signing.pub, copied beside it
  --password-file FILE  use the password in FILE instead of a new random one (e.g. one shared
                        by the simulated devices of `har sim`, sim-0000, sim-0001, ...)
  --reload-pid PID      send SIGHUP to this mosquitto process afterwards, so it re-reads the
                        password file without a restart
  -h, --help            this text

Without --reload-pid, reload the broker yourself (nobody is disconnected):
  docker compose -f deploy/docker-compose.yml kill -s HUP mosquitto   # the compose broker
  sudo systemctl reload mosquitto                                     # Debian's mosquitto
EOF
    echo
    echo "The broker's own logins, refused as device ids: $(login_names)"
}

die() {
    echo "add-device.sh: $*" >&2
    exit 2
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

login_names() {
    awk '!/^#/ && NF { printf "%s%s", sep, $1; sep = ", " }' "$here/mosquitto/logins"
}

passwd_file="${HAR_MOSQUITTO_PASSWD:-/etc/har/mosquitto/passwd}"
out_dir=""
broker_host=""
ca_file=""
public_key=""
password_file=""
reload_pid=""
device_id=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --passwd | --out | --broker-host | --ca-file | --public-key | --password-file | --reload-pid)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            case "$1" in
                --passwd) passwd_file="$2" ;;
                --out) out_dir="$2" ;;
                --broker-host) broker_host="$2" ;;
                --ca-file) ca_file="$2" ;;
                --public-key) public_key="$2" ;;
                --password-file) password_file="$2" ;;
                --reload-pid) reload_pid="$2" ;;
            esac
            shift 2
            ;;
        -h | --help) usage; exit 0 ;;
        --)
            [[ $# -eq 2 ]] || die "give exactly one DEVICE_ID after --"
            device_id="$2"
            shift 2
            ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            [[ -z "$device_id" ]] || die "one DEVICE_ID at a time (got '$device_id' and '$1')"
            device_id="$1"
            shift
            ;;
    esac
done

# ---- check everything before changing anything
[[ -n "$device_id" ]] || die "give the DEVICE_ID (see --help)"
# The alphabet of shared.topics.is_valid_id: one topic level, no wildcards, no '/'.
[[ "$device_id" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] \
    || die "invalid device id '$device_id': use 1-64 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit"
# The broker's own logins (deploy/mosquitto/logins), in any letter case: the ACL gives those
# users other rights, which a device would then share.
if awk -v id="${device_id,,}" '!/^#/ && tolower($1) == id { found = 1 } END { exit !found }' "$here/mosquitto/logins"; then
    die "'$device_id' is a reserved user name ($(login_names)): the ACL gives that user other rights; choose another device id"
fi
[[ "$broker_host" =~ ^[A-Za-z0-9.:-]*$ ]] || die "--broker-host '$broker_host' is not a host name or address"
[[ -z "$reload_pid" || "$reload_pid" =~ ^[1-9][0-9]*$ ]] || die "--reload-pid '$reload_pid' is not a process id"
for file in "$ca_file" "$public_key" "$password_file"; do
    [[ -z "$file" || -r "$file" ]] || die "cannot read $file"
done
[[ -f "$passwd_file" ]] \
    || die "password file $passwd_file does not exist (create it: install -m 0640 /dev/null $passwd_file; or give --passwd)"
[[ -w "$passwd_file" ]] || die "password file $passwd_file is not writable (run with sudo?)"
if awk -F: -v user="$device_id" '$1 == user { found = 1 } END { exit !found }' "$passwd_file"; then
    die "'$device_id' is already in $passwd_file (to replace its password: mosquitto_passwd -D $passwd_file $device_id, then run this again)"
fi
out_dir="${out_dir:-./provision/$device_id}"
[[ ! -e "$out_dir" ]] || die "$out_dir already exists: choose another --out or remove it"
example="$here/agent.example.toml"
[[ -r "$example" ]] || die "cannot read $example"
passwd_bin="$(command -v mosquitto_passwd || true)"
[[ -n "$passwd_bin" ]] || die "mosquitto_passwd not found (Debian: apt-get install mosquitto)"

if [[ -n "$password_file" ]]; then
    password="$(tr -d '\r\n' <"$password_file")"
    [[ -n "$password" ]] || die "$password_file is empty"
else
    # 24 random bytes: 192 bits, 32 URL-safe characters.
    password="$(head -c 24 /dev/urandom | base64 | tr '+/' '-_')"
fi

# ---- the provisioning folder, built beside its final place and moved there at the end
mkdir -p "$(dirname "$out_dir")"
staging="$(mktemp -d "$(dirname "$out_dir")/.add-device.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
chmod 0750 "$staging"

# Replace the value of one `key = ...` line of the example; the example must have exactly one.
set_value() {
    local key="$1" value="$2" file="$3"
    [[ "$(grep -c "^$key = " "$file")" == 1 ]] || die "$example must have exactly one '$key = ' line"
    sed -i "s|^$key = .*|$key = \"$value\"|" "$file"
}
install -m 0640 "$example" "$staging/agent.toml"
set_value device_id "$device_id" "$staging/agent.toml"
set_value username "$device_id" "$staging/agent.toml"
[[ -z "$broker_host" ]] || set_value host "$broker_host" "$staging/agent.toml"
(umask 077 && printf '%s' "$password" >"$staging/broker.password")
[[ -z "$ca_file" ]] || install -m 0644 "$ca_file" "$staging/ca.crt"
[[ -z "$public_key" ]] || install -m 0644 "$public_key" "$staging/model-signing.pub"

# ---- the broker user (the password is visible in `ps` for the moment mosquitto_passwd runs)
"$passwd_bin" -b "$passwd_file" "$device_id" "$password"
mv "$staging" "$out_dir"
trap - EXIT
echo "added $device_id to $passwd_file; provisioning folder: $out_dir"
if [[ "$device_id" == *.* ]]; then
    echo "note: Home Assistant discovery (agent.homeassistant_discovery) refuses ids with '.'"
fi

if [[ -n "$reload_pid" ]]; then
    kill -HUP "$reload_pid" || die "could not signal process $reload_pid: reload the broker yourself"
    echo "sent SIGHUP to mosquitto (pid $reload_pid): it re-reads the password file and ACL"
else
    echo "reload the broker: docker compose -f deploy/docker-compose.yml kill -s HUP mosquitto"
fi
