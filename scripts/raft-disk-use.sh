#!/usr/bin/env bash
# Disk use of the raft HA backend under load (issue 17's figure): three `keel ha-member`
# processes, a ResourceManager, a JobManager and a TaskManager on loopback, and a datagen job
# checkpointing every second, for MINUTES minutes (default 60). Prints each member's bytes on disk
# (log + snapshot) every minute, and at the end the HA store's applied index, so the growth
# without compaction can be compared with what stays on disk.
#
#   scripts/raft-disk-use.sh [MINUTES] [KEEL_BINARY]
set -euo pipefail
minutes=${1:-60}
keel=${2:-${KEEL_BIN:-target/release/keel}}
[[ -x "$keel" ]] || { echo "keel binary $keel not found: build it (cargo build --release -p keel) or pass its path" >&2; exit 1; }
dir=$(mktemp -d /tmp/keel-raft-disk.XXXXXX)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
members="1=127.0.0.1:$(port),2=127.0.0.1:$(port),3=127.0.0.1:$(port)"
cat > "$dir/keel.yaml" <<CONF
high-availability.type: raft
high-availability.raft.members: "$members"
high-availability.storageDir: $dir/ha
high-availability.cluster-id: disk
resourcemanager.rpc.address: 127.0.0.1
jobmanager.rpc.address: 127.0.0.1
taskmanager.rpc.address: 127.0.0.1
resourcemanager.rpc.port: $(port)
jobmanager.rpc.port: $(port)
taskmanager.rpc.port: 0
state.checkpoints.dir: $dir/checkpoints
CONF
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
for i in 1 2 3; do
  "$keel" --config "$dir/keel.yaml" --set high-availability.raft.member-id=$i ha-member >"$dir/member$i.log" 2>&1 &
  pids+=($!)
done
for role in resourcemanager jobmanager taskmanager; do
  "$keel" --config "$dir/keel.yaml" $role >"$dir/$role.log" 2>&1 &
  pids+=($!)
done
cat > "$dir/job.yaml" <<JOB
name: disk-use
parallelism: 1
sources:
  - name: numbers
    connector: datagen
    rows-per-second: 100
sinks:
  - name: out
    connector: blackhole
    from: numbers
config:
  execution.checkpointing.interval: 1 s
JOB
for _ in $(seq 60); do "$keel" --config "$dir/keel.yaml" run "$dir/job.yaml" >/dev/null 2>&1 && break; sleep 1; done
echo "minute,member1_bytes,member2_bytes,member3_bytes,latest_completed_checkpoint"
for m in $(seq "$minutes"); do
  sleep 60
  sizes=$(for i in 1 2 3; do du -sb "$dir/ha/raft-$i" | cut -f1; done | paste -sd,)
  done_cps=$("$keel" --config "$dir/keel.yaml" --output json status disk-use 2>/dev/null \
    | python3 -c 'import json,sys; s=json.load(sys.stdin); print(max([c["id"] for c in s.get("checkpoints",[]) if c["state"]=="completed"] or [0]))' 2>/dev/null || echo "?")
  echo "$m,$sizes,$done_cps"
done
for i in 1 2 3; do echo "member $i files:"; ls -l "$dir/ha/raft-$i"; done
echo "logs and data kept in $dir"
