#!/usr/bin/env bash
# Test and demo networks: a "host" is a network namespace holding a TAP for
# a guest, with an address on it. Everything this script creates is removed
# by `down`.
#
#   netns.sh up NS TAP ADDR/PREFIX [vnet_hdr|plain] [multi|single]
#                                 namespace NS with TAP (address ADDR on it)
#   netns.sh down NS              delete NS and everything in it
#
# The TAP is a multi-queue TAP unless `single` is given, so that a VM of the
# default machine type (2 queue pairs, godwit-1.2) can use it.
#
# godwit then runs inside the namespace, e.g.
#   ip netns exec NS godwit run --net tap,ifname=TAP ...
set -euo pipefail

usage() {
    sed -n '2,14p' "$0" >&2
    exit 2
}

cmd=${1:-}
case "$cmd" in
up)
    [ $# -ge 4 ] || usage
    ns=$2 tap=$3 addr=$4 mode=${5:-vnet_hdr} queues=${6:-multi}
    flags=()
    [ "$mode" = vnet_hdr ] && flags+=(vnet_hdr)
    [ "$queues" = multi ] && flags+=(multi_queue)
    ip netns add "$ns"
    trap 'ip netns del "$ns" 2>/dev/null' ERR
    ip -n "$ns" link set lo up
    ip -n "$ns" tuntap add dev "$tap" mode tap "${flags[@]}"
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
