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
# It also puts Debian's cloud kernel (linux-image-cloud-amd64, downloaded and
# unpacked, not installed) and its uncompressed vmlinux in
# $GODWIT_CACHE/debian-cloud-kernel (default /var/cache/godwit), for the
# linux_acpi and qemu_frontend tests.
# The Rust toolchain is not installed from Debian: godwit needs Rust 1.80 or
# newer, Debian 12 ships 1.63 (install one with https://rustup.rs).
set -euo pipefail

check_only=0
case "${1:-}" in
"") ;;
--check) check_only=1 ;;
*)
    sed -n '2,17p' "$0" >&2
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
    "acpica-tools|iasl|tests: acpi disassembles every ACPI table godwit builds"
    "lz4|lz4|tests: linux_acpi unpacks the vmlinux from Debian's cloud kernel"
    "qemu-system-x86|qemu-system-x86_64|tests: qemu_frontend runs QEMU (TCG) as a standard vhost-user frontend"
    "busybox-static|-|tests: qemu_frontend builds the Linux guest's initramfs around /bin/busybox"
    "openssl|openssl|demo: makes the TLS certificates for the migration"
    "tcpdump|tcpdump|tests: migration_tls captures the migration stream on the veth"
)

kernel_dir="${GODWIT_CACHE:-/var/cache/godwit}/debian-cloud-kernel"

# Debian's cloud kernel: the .deb of the package linux-image-cloud-amd64
# depends on, unpacked into $kernel_dir, and the ELF vmlinux from its bzImage
# (the LZ4 payload at (setup_sects + 1) * 512 + payload_offset; lz4 exits
# non-zero on the bytes after the frame, which is why its status is ignored
# and the ELF magic checked instead).
kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1
}

fetch_debian_kernel() {
    [ -s "$kernel_dir/vmlinux" ] && return 0
    local pkg
    pkg=$(kernel_package)
    if [ -z "$pkg" ]; then
        # A fresh machine may have no package lists yet.
        apt-get update -q >/dev/null
        pkg=$(kernel_package)
    fi
    if [ -z "$pkg" ]; then
        echo "install-deps: apt knows no linux-image-cloud-amd64: run apt-get update, or add Debian's main archive" >&2
        return 1
    fi
    echo "install-deps: fetching $pkg into $kernel_dir (downloaded and unpacked, not installed)"
    mkdir -p "$kernel_dir"
    rm -rf "$kernel_dir/deb" "$kernel_dir/root"
    mkdir -p "$kernel_dir/deb"
    (cd "$kernel_dir/deb" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    dpkg-deb -x "$kernel_dir"/deb/*.deb "$kernel_dir/root"
    local bz
    bz=$(ls "$kernel_dir"/root/boot/vmlinuz-* | head -n1)
    local setup_sects payload_offset
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
    payload_offset=$(od -An -tu4 -j $((0x248)) -N4 "$bz" | tr -d ' ')
    tail -c +$(((setup_sects + 1) * 512 + payload_offset + 1)) "$bz" | lz4 -dc >"$kernel_dir/vmlinux.tmp" 2>/dev/null || true
    if [ "$(head -c4 "$kernel_dir/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" != 7f454c46 ]; then
        echo "install-deps: could not unpack a vmlinux from $bz" >&2
        return 1
    fi
    cp "$bz" "$kernel_dir/bzImage"
    ls "$kernel_dir"/root/boot/config-* >/dev/null && cp "$kernel_dir"/root/boot/config-* "$kernel_dir/config"
    mv "$kernel_dir/vmlinux.tmp" "$kernel_dir/vmlinux"
    rm -rf "$kernel_dir/deb"
    echo "install-deps: Debian's cloud kernel is in $kernel_dir (vmlinux, bzImage, root/lib/modules)"
}

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
    if [ "$check_only" = 1 ]; then
        [ -s "$kernel_dir/vmlinux" ] || {
            echo "install-deps: missing Debian's cloud kernel in $kernel_dir, for tests: linux_acpi, qemu_frontend"
            exit 1
        }
    else
        fetch_debian_kernel
    fi
    check_cargo
    exit 0
fi
if [ "$check_only" = 1 ]; then
    exit 1
fi
if [ ${#missing[@]} -eq 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-deps: downloading the kernel .deb into $cache needs root: run as root (sudo $0)" >&2
        exit 1
    fi
    fetch_kernel_deb
    check_cargo
    exit 0
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
fetch_debian_kernel
check_cargo
