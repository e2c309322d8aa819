#!/bin/sh
# Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/):
# a snapshot and a host-caps report from a running godwit (needs KVM), and
# the seeds made with godwit's own encoders (fuzz/bodies/src/seeds.rs).
# Run from the repository root after `cargo build -p godwit-vmm`.
set -eu
GODWIT=${GODWIT:-target/debug/godwit}
CORPUS=fuzz/corpus
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for t in api_line net_spec host_caps migration_stream snapshot_state memory_header \
         vhost_user_record vhost_user_replies vhost_user_backend mmio_registers virtio_net; do
    mkdir -p "$CORPUS/$t"
done

# A small test guest, snapshotted while it serves.
"$GODWIT" run --memory 16M --cmdline godwit.mode=serve --serial null \
    --api-socket "$work/api.sock" >"$work/run.log" 2>&1 &
pid=$!
i=0
while [ ! -S "$work/api.sock" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
"$GODWIT" ctl --api-socket "$work/api.sock" snapshot "$work/snap" >/dev/null
"$GODWIT" ctl --api-socket "$work/api.sock" quit >/dev/null || true
wait $pid || true

# The snapshot target's raw form: form byte 0, then the file.
{ printf '\000'; cat "$work/snap/state.gws"; } >"$CORPUS/snapshot_state/real-state"
# The memory-file target: the file's length (u64 LE), then its first page.
python3 - "$work/snap/memory.gwm" "$CORPUS/memory_header/real-header" <<'PY'
import os, struct, sys
src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    head = f.read(4096)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", os.path.getsize(src)) + head)
PY
# A host-caps report, compact.
"$GODWIT" host-caps --name seed | python3 -c \
    'import json,sys; sys.stdout.write(json.dumps(json.load(sys.stdin), separators=(",", ":")))' \
    >"$CORPUS/host_caps/real-report"

GODWIT_FUZZ_WRITE_SEEDS=1 cargo test -p godwit-tests --test fuzz_corpus -- --test-threads=1
