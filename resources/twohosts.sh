#!/usr/bin/env bash
# Two "hosts" and a client on one L2 segment, for live migration:
#
#   <P>-a  host A: bridge br0 = TAP gwtap0 (the guest's) + veth to the segment; 10.<S>.0.11
#   <P>-b  host B: the same, 10.<S>.0.12
#   <P>-c  client: bridge seg0 joining both veths; 10.<S>.0.100
#
#   twohosts.sh up P S [vnet_hdr|plain] [vnet_hdr|plain]   (TAP modes of A and B)
#   twohosts.sh down P
#
# The TAPs are multi-queue TAPs (a VM of the default machine type has 2
# queue pairs). The guest takes 10.<S>.0.2 on either host. The migration stream runs
# from A to B over TCP across the veths. `down` removes everything.
set -euo pipefail

usage() {
    sed -n '2,14p' "$0" >&2
    exit 2
}

host_up() {
    local ns=$1 addr=$2 mode=$3 client=$4 port=$5
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    if [ "$mode" = vnet_hdr ]; then
        ip -n "$ns" tuntap add dev gwtap0 mode tap vnet_hdr multi_queue
    else
        ip -n "$ns" tuntap add dev gwtap0 mode tap multi_queue
    fi
    ip -n "$ns" link add br0 type bridge
    ip -n "$ns" link add eth0 type veth peer name "$port" netns "$client"
    ip -n "$ns" link set gwtap0 master br0
    ip -n "$ns" link set eth0 master br0
    ip -n "$ns" addr add "$addr/24" dev br0
    for dev in gwtap0 eth0 br0; do ip -n "$ns" link set "$dev" up; done
    ip -n "$client" link set "$port" master seg0
    ip -n "$client" link set "$port" up
}

case "${1:-}" in
up)
    [ $# -ge 3 ] || usage
    p=$2 s=$3 mode_a=${4:-vnet_hdr} mode_b=${5:-vnet_hdr}
    trap '"$0" down "$p"' ERR
    ip netns add "$p-c"
    ip -n "$p-c" link set lo up
    ip -n "$p-c" link add seg0 type bridge
    ip -n "$p-c" addr add "10.$s.0.100/24" dev seg0
    ip -n "$p-c" link set seg0 up
    host_up "$p-a" "10.$s.0.11" "$mode_a" "$p-c" porta
    host_up "$p-b" "10.$s.0.12" "$mode_b" "$p-c" portb
    ;;
down)
    [ $# -ge 2 ] || usage
    for ns in "$2-a" "$2-b" "$2-c"; do ip netns del "$ns" 2>/dev/null || true; done
    ;;
*)
    usage
    ;;
esac
