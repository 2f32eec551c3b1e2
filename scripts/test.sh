#!/usr/bin/env bash
# Runs every test: unit tests, HA tests against a real etcd, and the process-level
# integration tests (real etcd, real keel processes). Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# The integration tests start the keel binary as separate processes: build it first.
cargo build -p keel
cargo test --workspace -- --test-threads="${KEEL_TEST_THREADS:-2}"
