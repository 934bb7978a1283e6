# shellcheck shell=bash
# Shared by scripts/setup, scripts/test, scripts/vm-test and the Vagrant scripts: idempotent apt
# installs (Debian/Ubuntu, root). Every apt call waits for another apt or dpkg to finish (an
# unattended upgrade at a VM's first boot, another install on the same machine) instead of
# failing on its lock: up to APT_LOCK_TIMEOUT seconds (default 600).
export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
APT_LOCK_TIMEOUT=${APT_LOCK_TIMEOUT:-600}

say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# apt-get that waits for dpkg's frontend lock (apt's own option, so install and remove wait).
apt_get() { apt-get -o "DPkg::Lock::Timeout=$APT_LOCK_TIMEOUT" "$@"; }

# `apt-get update` does not wait for the lists lock whatever the option says: retry until it
# is free, for as long as the lock timeout allows.
apt_update_once() {
    [ "$APT_UPDATED" -eq 0 ] || return 0
    local waited=0 out
    until out=$(apt_get update -qq 2>&1); do
        if ! grep -q 'Could not get lock' <<<"$out" || [ "$waited" -ge "$APT_LOCK_TIMEOUT" ]; then
            printf '%s\n' "$out" >&2
            return 1
        fi
        [ "$waited" -gt 0 ] || say "apt's package lists are locked by another apt: waiting (up to ${APT_LOCK_TIMEOUT}s)"
        sleep 2
        waited=$((waited + 2))
    done
    [ -z "$out" ] || printf '%s\n' "$out" >&2
    APT_UPDATED=1
}

apt_install() {
    local missing=()
    for p in "$@"; do installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    apt_update_once
    say "installing ${missing[*]}"
    apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

have_lists() { compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; }

# Asks the package lists the machine has; fetches them only when there are none, so a re-run
# (or a run where the registry is out of reach) does not wait on the network.
has_candidate() {
    have_lists || apt_update_once
    apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [0-9]'
}

# The package a metapackage points at, e.g. linux-image-amd64 -> linux-image-6.1.0-56-amd64
first_dependency() {
    have_lists || apt_update_once
    apt-cache depends "$@" 2>/dev/null | awk '/Depends:/ {print $2; exit}'
}
