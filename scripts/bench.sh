#!/usr/bin/env bash
# Throughput benchmark: a bare rdkafka pass-through loop against the same pass-through as Keel
# jobs (parallelism 1 and 2; at-least-once with and without 1 s checkpoints, exactly-once with
# 1 s checkpoints) on one Apache Kafka node (KRaft) on loopback, or on the cluster
# KEEL_TEST_KAFKA_BOOTSTRAP names. Builds keel and keel-bench in release first. Arguments go to
# keel-bench (e.g. --records 200000 --size 100 --runs bare,p1,p1-eos; see `keel-bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# The broker with the JVM's optimizing compiler and G1 (the test kit's default is the client
# compiler and the serial collector, lighter for tests on 2 shared cores).
export KEEL_TEST_KAFKA_JVM_OPTS="${KEEL_TEST_KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20}"
cargo build --release -p keel -p keel-bench
exec target/release/keel-bench --keel-bin target/release/keel "$@"
