# shellcheck shell=bash
# Shared by scripts/setup and scripts/vm-test: idempotent apt installs (Debian/Ubuntu, root).
export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0

say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then apt-get update -qq; APT_UPDATED=1; fi
}

apt_install() {
    local missing=()
    for p in "$@"; do installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    apt_update_once
    say "installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
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
