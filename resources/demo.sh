#!/usr/bin/env bash
# The demo: boots the bundled test guest with two vCPUs, its console on stdout.
set -euo pipefail
GODWIT=${1:-target/debug/godwit}
echo "== booting the built-in test guest (2 vCPUs, 128 MiB)"
"$GODWIT" run --vcpus 2 --memory 128M --serial stdio </dev/null
echo "== the guest powered off; godwit exited with status $?"
