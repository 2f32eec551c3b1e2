#!/usr/bin/env bash
# Builds keel and starts the local dev cluster (ResourceManager, JobManager, TaskManager as
# three processes on the embedded `local` HA backend) and runs the demo job. Ctrl-C stops it.
# Extra arguments go to `keel dev` (see `keel dev --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build -p keel
exec target/debug/keel dev --demo "$@"
