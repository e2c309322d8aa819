#!/usr/bin/env bash
# godwit's demo: two local "hosts" (network namespaces on one L2 segment
# with a client, from resources/twohosts.sh), the built-in test guest booted
# on host A with a virtio-net NIC on a TAP, pinged from the client, then
# live-migrated to host B over mutual TLS (certificates made here with
# openssl) while it keeps answering. Needs root (namespaces).
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

echo "== TLS credentials for both hosts (QEMU's tls-creds-x509 layout, one CA)"
tls=$work/tls
mkdir "$tls"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key "$tls/ca-key.pem"
openssl req -x509 -new -key "$tls/ca-key.pem" -subj /CN=godwit-demo-CA -days 1 -out "$tls/ca-cert.pem"
issue() { # ROLE CN EXTENSIONS
    key "$tls/$1-key.pem"
    openssl req -new -key "$tls/$1-key.pem" -subj "/CN=$2" -out "$work/$1.csr"
    openssl x509 -req -in "$work/$1.csr" -CA "$tls/ca-cert.pem" -CAkey "$tls/ca-key.pem" \
        -CAcreateserial -CAserial "$work/ca.srl" -days 1 -extfile <(printf '%s\n' "$3") -out "$tls/$1-cert.pem" 2>/dev/null
}
issue server "host B" "subjectAltName=IP:10.$subnet.0.12
extendedKeyUsage=serverAuth"
issue client "host A" "extendedKeyUsage=clientAuth"
ls "$tls" | grep -v ca-key | tr '\n' ' '
echo

echo "== host B: waiting for the VM (godwit run --incoming tls:10.$subnet.0.12:4444 --tls-dir DIR)"
ip netns exec "$prefix-b" "$GODWIT" run --incoming "tls:10.$subnet.0.12:4444" --tls-dir "$tls" \
    --net tap,ifname=gwtap0 --api-socket "$work/b.sock" </dev/null >"$work/b.console" 2>"$work/b.log" &
pids+=($!)
for _ in $(seq 100); do ip netns exec "$prefix-b" ss -ltnH | grep -q ':4444' && break; sleep 0.1; done

echo "== host A: live-migrating to host B over mutual TLS 1.3"
"$GODWIT" ctl --api-socket "$work/a.sock" migrate-set-parameters "{\"tls-creds\": \"$tls\"}" >/dev/null
"$GODWIT" ctl --api-socket "$work/a.sock" migrate "tls:10.$subnet.0.12:4444"
last_a=$(grep '^heartbeat' "$work/a.console" | tail -1)
for _ in $(seq 100); do grep -q "^heartbeat" "$work/b.console" 2>/dev/null && break; sleep 0.1; done
echo "   last on A: $last_a; first on B: $(grep '^heartbeat' "$work/b.console" | head -1)"

echo "== client: ping the guest, now on host B"
ip netns exec "$prefix-c" ping -c 2 -W 2 "$guest" | tail -2
"$GODWIT" ctl --api-socket "$work/b.sock" query-status
echo "== host B: query-migrate reports the incoming migration"
"$GODWIT" ctl --api-socket "$work/b.sock" query-migrate
"$GODWIT" ctl --api-socket "$work/b.sock" quit >/dev/null
echo "== done: the guest moved from host A to host B"
