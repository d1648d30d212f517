#!/usr/bin/env bash
# Add one of the broker's own logins (not a device): a random password in the Mosquitto
# password file, and the password in a file of its own to give to whoever logs in with it.
set -euo pipefail
export LC_ALL=C

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
logins="$here/mosquitto/logins"

usage() {
    cat <<EOT
Usage: deploy/add-login.sh [options] [--] USER

Adds USER, one of the logins in deploy/mosquitto/logins, to the broker's password file with a
random password (mosquitto_passwd -b), and writes the password to a file (mode 0600) for the
integration that logs in as USER. The ACL (deploy/mosquitto/acl) already has its rights.

One connection per login: the broker takes the client id from the user name, so a second client
on a login takes the first one's place. Give every integration its own:

$(grep -v '^#' "$logins" | sed 's/^/  /')

Options:
  --passwd FILE     the broker's password file; must exist (default: \$HAR_MOSQUITTO_PASSWD,
                    else /etc/har/mosquitto/passwd)
  --out FILE        where the password goes; must not exist (default: ./secrets/USER.password)
  --reload-pid PID  send SIGHUP to this mosquitto process afterwards (it re-reads the file)
  -h, --help        this text
EOT
}

die() {
    echo "add-login.sh: $*" >&2
    exit 2
}

passwd_file="${HAR_MOSQUITTO_PASSWD:-/etc/har/mosquitto/passwd}"
out_file=""
reload_pid=""
user=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --passwd | --out | --reload-pid)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            case "$1" in
                --passwd) passwd_file="$2" ;;
                --out) out_file="$2" ;;
                --reload-pid) reload_pid="$2" ;;
            esac
            shift 2
            ;;
        -h | --help) usage; exit 0 ;;
        --)
            [[ $# -eq 2 ]] || die "give exactly one USER after --"
            user="$2"
            shift 2
            ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            [[ -z "$user" ]] || die "one USER at a time (got '$user' and '$1')"
            user="$1"
            shift
            ;;
    esac
done

# ---- check everything before changing anything
[[ -n "$user" ]] || die "give the USER (see --help)"
purpose="$(awk -v user="$user" '$1 == user { $1 = ""; sub(/^ +/, ""); print; found = 1 } END { exit !found }' "$logins")" \
    || die "'$user' is not one of the logins in $logins (a device? use add-device.sh)"
[[ -z "$reload_pid" || "$reload_pid" =~ ^[1-9][0-9]*$ ]] || die "--reload-pid '$reload_pid' is not a process id"
[[ -f "$passwd_file" ]] \
    || die "password file $passwd_file does not exist (create it: install -m 0640 /dev/null $passwd_file; or give --passwd)"
[[ -w "$passwd_file" ]] || die "password file $passwd_file is not writable (run with sudo?)"
if awk -F: -v user="$user" '$1 == user { found = 1 } END { exit !found }' "$passwd_file"; then
    die "'$user' is already in $passwd_file (to replace its password: mosquitto_passwd -D $passwd_file $user, then run this again)"
fi
out_file="${out_file:-./secrets/$user.password}"
[[ ! -e "$out_file" ]] || die "$out_file already exists: choose another --out or remove it"
passwd_bin="$(command -v mosquitto_passwd || true)"
[[ -n "$passwd_bin" ]] || die "mosquitto_passwd not found (Debian: apt-get install mosquitto)"

# 24 random bytes: 192 bits, 32 URL-safe characters.
password="$(head -c 24 /dev/urandom | base64 | tr '+/' '-_')"
mkdir -p "$(dirname "$out_file")"
(umask 077 && printf '%s' "$password" >"$out_file")
# The password is visible in `ps` for the moment mosquitto_passwd runs.
"$passwd_bin" -b "$passwd_file" "$user" "$password" || { rm -f "$out_file"; die "mosquitto_passwd failed"; }
echo "added $user ($purpose) to $passwd_file; its password is in $out_file"

if [[ -n "$reload_pid" ]]; then
    kill -HUP "$reload_pid" || die "could not signal process $reload_pid: reload the broker yourself"
    echo "sent SIGHUP to mosquitto (pid $reload_pid): it re-reads the password file"
else
    echo "reload the broker: docker compose -f deploy/docker-compose.yml kill -s HUP mosquitto"
fi
