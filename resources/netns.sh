#!/usr/bin/env bash
# Test and demo networks: a "host" is a network namespace holding a TAP for
# a guest, with an address on it. Everything this script creates is removed
# by `down`.
#
#   netns.sh up NS TAP ADDR/PREFIX [vnet_hdr|plain]   namespace NS with TAP (address ADDR on it)
#   netns.sh down NS                                  delete NS and everything in it
#
# godwit then runs inside the namespace, e.g.
#   ip netns exec NS godwit run --net tap,ifname=TAP ...
set -euo pipefail

usage() {
    sed -n '2,10p' "$0" >&2
    exit 2
}

cmd=${1:-}
case "$cmd" in
up)
    [ $# -ge 4 ] || usage
    ns=$2 tap=$3 addr=$4 mode=${5:-vnet_hdr}
    ip netns add "$ns"
    trap 'ip netns del "$ns" 2>/dev/null' ERR
    ip -n "$ns" link set lo up
    if [ "$mode" = vnet_hdr ]; then
        ip -n "$ns" tuntap add dev "$tap" mode tap vnet_hdr
    else
        ip -n "$ns" tuntap add dev "$tap" mode tap
    fi
    ip -n "$ns" addr add "$addr" dev "$tap"
    ip -n "$ns" link set "$tap" up
    ;;
down)
    [ $# -ge 2 ] || usage
    ip netns del "$2" 2>/dev/null || true
    ;;
*)
    usage
    ;;
esac
