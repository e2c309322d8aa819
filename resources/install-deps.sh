#!/usr/bin/env bash
# Installs the Debian packages that `make build`, `make demo` and `make test`
# need and that this machine lacks; says what it installs and why. Run as
# root on Debian 12 (or a derivative with apt). `make demo`, `make test` and
# .ci/run call it, so both README commands set themselves up.
#
#   install-deps.sh           install what is missing
#   install-deps.sh --check   only list what is missing; exit 1 if anything is
#
# A package counts as present when the command it is needed for is on PATH
# (so a ping from another package is fine) or when dpkg has it installed.
# The Rust toolchain is not installed from Debian: godwit needs Rust 1.80 or
# newer, Debian 12 ships 1.63 (install one with https://rustup.rs).
set -euo pipefail

check_only=0
case "${1:-}" in
"") ;;
--check) check_only=1 ;;
*)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac

# package | command that proves it is there ("-": ask dpkg) | who needs it
deps=(
    "gcc|gcc|build: the test guest is C, and cargo links with cc"
    "libc6-dev|-|build: crt files and libc for linking godwit"
    "make|make|build: the test guest's Makefile"
    "binutils|objdump|build: as and ld for the guest; tests: guest_safety disassembles it"
    "iproute2|ip|demo and tests: namespaces, TAPs, bridges, veths (ip, ss)"
    "iputils-ping|ping|demo and tests: pinging the guest in net_tap, migration, vhost_*"
    "ethtool|ethtool|tests: net_tap switches TAP offloads"
    "util-linux|unshare|tests: boot runs godwit in a private mount namespace"
    "dpdk-dev|dpdk-testpmd|tests: the vhost-user tests use DPDK testpmd as the peer"
    "openssl|openssl|demo: makes the TLS certificates for the migration"
    "tcpdump|tcpdump|tests: migration_tls captures the migration stream on the veth"
)

missing=()
for dep in "${deps[@]}"; do
    IFS='|' read -r pkg cmd why <<<"$dep"
    if [ "$cmd" != - ] && command -v "$cmd" >/dev/null; then
        continue
    fi
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] && continue
    echo "install-deps: missing $pkg, for $why"
    missing+=("$pkg")
done

check_cargo() {
    if ! command -v cargo >/dev/null; then
        echo "install-deps: cargo is not on PATH: install a Rust toolchain (https://rustup.rs), then re-run" >&2
        exit 1
    fi
}

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all build, demo and test packages are present"
    check_cargo
    exit 0
fi
if [ "$check_only" = 1 ]; then
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: installing ${missing[*]} needs root: run as root (sudo $0)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "install-deps: no apt-get on this machine: install ${missing[*]} with its package manager" >&2
    exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-deps: installed ${missing[*]}"
check_cargo
