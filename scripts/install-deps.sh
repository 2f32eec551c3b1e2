#!/usr/bin/env bash
# Installs what building and testing Keel needs and a fresh Debian machine lacks:
# protoc (tonic code generation and etcd-client), etcd + etcdctl (HA backend and tests),
# iproute2 (network namespaces of the chaos suite), a Java 17 runtime and Maven (Apache Kafka,
# the broker of every test), the Java 17 compiler (the benchmark's Kafka Streams application,
# built only by the benchmark), then Apache Kafka's jars from Maven Central (scripts/install-kafka.sh).
# Idempotent: does nothing when everything is there.
set -euo pipefail

need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v kill >/dev/null 2>&1 || need+=(procps)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v make >/dev/null 2>&1 || need+=(make)
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
# The compiler builds the benchmark's Kafka Streams application (scripts/install-streams.sh).
command -v javac >/dev/null 2>&1 || need+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  # Debian's etcd-server package may start a system etcd; the tests start their own.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
    $SUDO systemctl stop etcd || true
  fi
fi

# Apache Kafka's broker jars (Maven Central), which keel-testkit starts.
"$(dirname "$0")/install-kafka.sh" >/dev/null

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install the Rust toolchain (rustup) first" >&2
  exit 1
fi
