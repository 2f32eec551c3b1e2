#!/usr/bin/env bash
# Installs Apache Kafka's broker for the tests, the chaos suite, the benchmark and the demo:
# the jars of org.apache.kafka:kafka_2.13 (and the log4j2 backend it logs through), fetched
# from Maven Central by Maven from scripts/kafka/pom.xml into a cache directory. Nothing else
# is downloaded. Idempotent: a complete cache is left alone.
#
# Prints the directory holding the jars (what KEEL_KAFKA_LIBS may be set to); everything else
# goes to stderr. The cache is $KEEL_CACHE_DIR (default ~/.cache/keel)/kafka-<version>.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
pom="$here/kafka/pom.xml"

version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
[ -n "$version" ] || { echo "no <kafka.version> in $pom" >&2; exit 1; }
cache="${KEEL_CACHE_DIR:-$HOME/.cache/keel}/kafka-$version"
libs="$cache/libs"
# The pom's hash marks a complete fetch: a changed pom (another version, another jar) fetches again.
stamp="$cache/.complete-$(sha256sum "$pom" | cut -c1-16)"

if [ ! -f "$stamp" ]; then
  for tool in java mvn; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$tool is missing: run scripts/install-deps.sh" >&2; exit 1; }
  done
  echo "fetching Apache Kafka $version from Maven Central into $libs" >&2
  # Fetched beside the old directory, then swapped in with two renames: brokers and tools that
  # run from the old jars meanwhile (other test runs) keep finding them.
  fresh="$cache/libs.new-$$"
  rm -rf "$fresh"
  mkdir -p "$fresh"
  mvn -q -B -f "$pom" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$fresh" >&2
  ls "$fresh"/kafka_2.13-"$version".jar >/dev/null
  if [ -d "$libs" ]; then
    mv "$libs" "$cache/libs.old-$$"
  fi
  mv "$fresh" "$libs"
  rm -rf "$cache/libs.old-$$"
  rm -f "$cache"/.complete-*
  touch "$stamp"
fi
echo "$libs"
