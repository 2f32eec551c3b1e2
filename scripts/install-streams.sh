#!/usr/bin/env bash
# Builds the benchmark's Kafka Streams application (scripts/streams: pom.xml and its Java
# sources) with Maven into a cache directory: the application's jar plus every runtime
# dependency jar (org.apache.kafka:kafka-streams and what it needs, from Maven Central), all in
# one directory, so `java -cp '<dir>/*' dev.keel.streams.BenchApp` runs it. Nothing is built in
# the source tree. Idempotent: a complete build of the same pom and sources is left alone.
#
# Prints the directory holding the jars; everything else goes to stderr. The cache is
# $KEEL_CACHE_DIR (default ~/.cache/keel)/streams-<kafka-streams version>.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/streams"
pom="$src/pom.xml"

version="$(sed -n 's:.*<kafka.streams.version>\(.*\)</kafka.streams.version>.*:\1:p' "$pom")"
[ -n "$version" ] || { echo "no <kafka.streams.version> in $pom" >&2; exit 1; }
cache="${KEEL_CACHE_DIR:-$HOME/.cache/keel}/streams-$version"
libs="$cache/libs"
# The hash of the pom and every source file marks a complete build: a changed pom or source
# builds again.
hash="$(cd "$src" && { echo pom.xml; find src -type f | LC_ALL=C sort; } | xargs sha256sum | sha256sum | cut -c1-16)"
stamp="$cache/.complete-$hash"

if [ ! -f "$stamp" ]; then
  command -v java >/dev/null 2>&1 || { echo "java is missing: run scripts/install-deps.sh" >&2; exit 1; }
  command -v mvn >/dev/null 2>&1 || { echo "mvn is missing: run scripts/install-deps.sh" >&2; exit 1; }
  command -v javac >/dev/null 2>&1 || {
    echo "javac is missing (a Java runtime alone cannot build the Streams application):" \
      "run apt-get install openjdk-17-jdk-headless, or scripts/install-deps.sh" >&2
    exit 1
  }
  echo "building the Kafka Streams $version benchmark application into $libs" >&2
  # Built beside the old directory, then swapped in with two renames: instances that run from
  # the old jars meanwhile keep finding them.
  mkdir -p "$cache"
  fresh="$cache/libs.new-$$"
  build="$cache/build-$$"
  trap 'rm -rf "$fresh" "$build"' EXIT
  rm -rf "$fresh" "$build"
  mkdir -p "$fresh"
  mvn -q -B -f "$pom" -Dstreams.build.dir="$build" package dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$fresh" >&2
  cp "$build/keel-streams-bench.jar" "$fresh/"
  ls "$fresh/kafka-streams-$version.jar" >/dev/null
  if [ -d "$libs" ]; then
    mv "$libs" "$cache/libs.old-$$"
  fi
  mv "$fresh" "$libs"
  rm -rf "$cache/libs.old-$$" "$build"
  rm -f "$cache"/.complete-*
  touch "$stamp"
fi
echo "$libs"
