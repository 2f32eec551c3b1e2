#!/usr/bin/env bash
# Benchmarks. Builds keel and the benchmark binaries in release first.
#
#   scripts/bench.sh [ARGS]
#     Throughput: a bare rdkafka pass-through loop against the same pass-through as Keel jobs
#     (parallelism 1 and 2; at-least-once with and without 1 s checkpoints, exactly-once with
#     1 s checkpoints) on one Apache Kafka node (KRaft) on loopback, or on the cluster
#     KEEL_TEST_KAFKA_BOOTSTRAP names. ARGS go to keel-bench (e.g. --records 200000 --size 100
#     --runs bare,p1,p1-eos; see `keel-bench --help`). Issue 15's figures:
#       scripts/bench.sh --records 500000 --repeat 3 --runs bare,bare-csv,p1,p1-csv,p1-json,dg,dg-fp,lat
#
#   scripts/bench.sh --allocator system|mimalloc|jemalloc [ARGS]
#     The same with the keel binary built with that global allocator (the keel crate's cargo
#     feature `mimalloc` / `jemalloc`; `system`: no feature), copied to
#     $CARGO_TARGET_DIR/release/keel-<allocator> (default target dir: target/) and run from there.
#   scripts/bench.sh --build-allocators
#     Only builds the three variants (keel-system, keel-mimalloc, keel-jemalloc) and says where.
#
#   scripts/bench.sh --peer flink[,streams] [--publish] [ARGS]
#     Side by side: the same Kafka jobs on Apache Flink (and Kafka Streams) and on Keel, on one
#     Apache Kafka node, one system after the other; prints one table. Installs the peers first
#     (pinned, into the cache directory) and the chart's Python packages. Writes
#     target/versus/{report.md,timeline.csv,events.csv,versus.png}; with --publish also
#     docs/benchmarks.md and docs/versus.png. ARGS go to keel-versus (e.g. --parts faults
#     --kills 5 --records 500000; see `keel-versus --help`). Not part of the test command.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# The broker with the JVM's optimizing compiler and G1 (the test kit's default is the client
# compiler and the serial collector, lighter for tests on 2 shared cores).
export KEEL_TEST_KAFKA_JVM_OPTS="${KEEL_TEST_KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20}"

release="${CARGO_TARGET_DIR:-target}/release"

# Builds the keel binary with global allocator $1 and copies it to $release/keel-$1.
build_keel_with() {
  case "$1" in
    system) cargo build --release -p keel ;;
    mimalloc | jemalloc) cargo build --release -p keel --features "$1" ;;
    *) echo "bench.sh: --allocator takes system, mimalloc or jemalloc, not '$1'" >&2; exit 2 ;;
  esac
  cp "$release/keel" "$release/keel-$1"
}

if [ "${1:-}" = "--build-allocators" ]; then
  for a in mimalloc jemalloc system; do
    build_keel_with "$a"
  done
  # The last build was the default (system) one, so $release/keel is the system variant again.
  ls -l "$release"/keel-system "$release"/keel-mimalloc "$release"/keel-jemalloc
  exit 0
fi

if [ "${1:-}" = "--allocator" ]; then
  alloc="${2:?--allocator needs system, mimalloc or jemalloc}"
  shift 2
  cargo build --release -p keel-bench
  build_keel_with "$alloc"
  exec "$release/keel-bench" --keel-bin "$release/keel-$alloc" "$@"
fi

if [ "${1:-}" != "--peer" ]; then
  cargo build --release -p keel -p keel-bench
  exec "$release/keel-bench" --keel-bin "$release/keel" "$@"
fi

peers="${2:?--peer needs a list: flink or flink,streams}"
shift 2
publish=0
if [ "${1:-}" = "--publish" ]; then
  publish=1
  shift
fi
# The chart's packages, pinned, into the cache directory (stamp = hash of the requirements).
req=scripts/versus/requirements.txt
mpl="${KEEL_CACHE_DIR:-$HOME/.cache/keel}/versus-python"
stamp="$mpl/.complete-$(sha256sum "$req" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing the chart's Python packages into $mpl" >&2
  rm -rf "$mpl.new"
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$mpl.new" -r "$req" >&2
  rm -rf "$mpl"
  mv "$mpl.new" "$mpl"
  touch "$stamp"
fi
cargo build --release -p keel -p keel-bench
out=target/versus
"$release/keel-versus" --keel-bin "$release/keel" --repo . --peers "$peers" --out "$out" "$@"
PYTHONPATH="$mpl" python3 scripts/versus/chart.py "$out/timeline.csv" "$out/events.csv" "$out/versus.png"
echo "chart: $out/versus.png"
if [ "$publish" = 1 ]; then
  cp "$out/report.md" docs/benchmarks.md
  cp "$out/versus.png" docs/versus.png
  echo "published docs/benchmarks.md and docs/versus.png"
fi
