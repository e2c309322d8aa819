#!/usr/bin/env bash
# godwit's demo: two local "hosts" (network namespaces on one L2 segment
# with a client, from resources/twohosts.sh), the built-in test guest booted
# on host A with a virtio-net NIC on a TAP, pinged from the client, then
# live-migrated to host B while it keeps answering. Needs root (namespaces).
set -euo pipefail

GODWIT=$(realpath "${1:-target/debug/godwit}")
here=$(dirname "$(realpath "$0")")
prefix=gwdemo
subnet=199
work=$(mktemp -d /tmp/godwit-demo.XXXXXX)
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    "$here/twohosts.sh" down "$prefix"
    rm -rf "$work"
}
trap cleanup EXIT

if [ "$(id -u)" != 0 ]; then
    echo "demo: run as root: it creates network namespaces and TAP devices" >&2
    exit 1
fi

"$here/twohosts.sh" down "$prefix"
"$here/twohosts.sh" up "$prefix" "$subnet"
guest=10.$subnet.0.2

echo "== host A: booting the test guest (2 vCPUs, virtio-net on a TAP, machine type godwit)"
ip netns exec "$prefix-a" "$GODWIT" run --vcpus 2 --net tap,ifname=gwtap0 \
    --api-socket "$work/a.sock" \
    --cmdline "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms=500 ip=$guest::10.$subnet.0.100:255.255.255.0" \
    </dev/null >"$work/a.console" 2>"$work/a.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "^heartbeat 2" "$work/a.console" 2>/dev/null && break; sleep 0.1; done
sed -n '/virtio-net0/p;/serve: ready/p' "$work/a.console"

echo "== client: ping the guest on host A"
ip netns exec "$prefix-c" ping -c 2 -W 2 "$guest" | tail -2

echo "== host B: waiting for the VM (godwit run --incoming tcp:10.$subnet.0.12:4444)"
ip netns exec "$prefix-b" "$GODWIT" run --incoming "tcp:10.$subnet.0.12:4444" --net tap,ifname=gwtap0 \
    --api-socket "$work/b.sock" </dev/null >"$work/b.console" 2>"$work/b.log" &
pids+=($!)
for _ in $(seq 100); do ip netns exec "$prefix-b" ss -ltnH | grep -q ':4444' && break; sleep 0.1; done

echo "== host A: live-migrating to host B"
"$GODWIT" ctl --api-socket "$work/a.sock" migrate "tcp:10.$subnet.0.12:4444"
last_a=$(grep '^heartbeat' "$work/a.console" | tail -1)
for _ in $(seq 100); do grep -q "^heartbeat" "$work/b.console" 2>/dev/null && break; sleep 0.1; done
echo "   last on A: $last_a; first on B: $(grep '^heartbeat' "$work/b.console" | head -1)"

echo "== client: ping the guest, now on host B"
ip netns exec "$prefix-c" ping -c 2 -W 2 "$guest" | tail -2
"$GODWIT" ctl --api-socket "$work/b.sock" query-status
"$GODWIT" ctl --api-socket "$work/b.sock" quit >/dev/null
echo "== done: the guest moved from host A to host B"
