#!/usr/bin/env bash
# The long chaos run (docs/chaos.md) on three Apache Kafka nodes it starts itself (KRaft, RF 3,
# min.insync.replicas 2): builds keel and keel-chaos, then runs keel-chaos with the arguments
# given (--help lists them and the fault kinds), for example:
#   scripts/chaos.sh --seed 42 --duration 10m
#   scripts/chaos.sh --seed 42 --duration 10m --mode exactly-once
#   scripts/chaos.sh --seed 42 --kinds kill-broker-leader,pause-broker,partition-broker --faults 6
#   scripts/chaos.sh --seed 42 --faults 20 --list      # print the schedule only
#   scripts/chaos.sh --seed 42 --duration 5m --ha raft # the raft HA store (keel ha-member) instead of etcd
# The seed is printed first; a failing run prints the command that replays it. Network
# partitions need root and iproute2 (network namespaces); without them they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build -p keel
cargo build -p keel-tests --bin keel-chaos
exec target/debug/keel-chaos "$@"
