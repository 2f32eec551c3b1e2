#!/usr/bin/env bash
# Builds keel and starts the local dev cluster (ResourceManager, JobManager, TaskManager as
# three processes on the embedded `local` HA backend) with a local Apache Kafka broker (one
# KRaft node on 127.0.0.1:9092; keel dev takes its jars from $KEEL_KAFKA_LIBS, else from
# scripts/install-kafka.sh), and runs the two demo jobs: datagen -> files, and Kafka -> Kafka
# with 1 s checkpoints and the exactly-once sink. It prints how to produce to the demo's source
# topic and read its output. Ctrl-C stops everything, the broker included. Extra arguments go
# to `keel dev` (see `keel dev --help`; --no-kafka runs the datagen demo alone).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build -p keel
exec target/debug/keel dev --demo "$@"
