#!/usr/bin/env bash
# Installs Apache Flink, the peer of the side-by-side benchmark (keel-versus), into a cache directory:
# - Flink's runtime jars, scripts and shipped conf/ from PyPI (apache-flink and apache-flink-libraries
#   of <flink.version> in scripts/flink/pom.xml, `pip install --no-deps --target`): DIST/pyflink is a
#   working FLINK_HOME;
# - from Maven Central, by Maven from scripts/flink/pom.xml: the Kafka SQL connector (into
#   FLINK_HOME/lib), the SQL gateway that bin/sql-client.sh needs and the wheel lacks (into
#   FLINK_HOME/opt), and a ZooKeeper server with its runtime jars (into CACHE/zookeeper) for Flink's
#   ZooKeeper HA.
# Nothing else is downloaded. The benchmark runs this, never the test command: CI does not fetch Flink.
# Idempotent: a complete cache is left alone.
#
# Prints FLINK_HOME; everything else goes to stderr. The cache is $KEEL_CACHE_DIR (default
# ~/.cache/keel)/flink-<version>, holding dist/pyflink (FLINK_HOME) and zookeeper/ (the jars).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
pom="$here/flink/pom.xml"

prop() { sed -n "s:.*<$1>\(.*\)</$1>.*:\1:p" "$pom"; }
version="$(prop flink.version)"
connector="$(prop flink.kafka.connector.version)"
zookeeper="$(prop zookeeper.version)"
for v in version connector zookeeper; do
  [ -n "${!v}" ] || { echo "scripts/flink/pom.xml lacks the $v property" >&2; exit 1; }
done
cache="${KEEL_CACHE_DIR:-$HOME/.cache/keel}/flink-$version"
# The pom's hash (and this script's) marks a complete install: a changed version fetches again.
stamp="$cache/.complete-$(cat "$pom" "$0" | sha256sum | cut -c1-16)"

if [ ! -f "$stamp" ]; then
  for tool in java mvn python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$tool is missing: run scripts/install-deps.sh" >&2; exit 1; }
  done
  python3 -m pip --version >/dev/null 2>&1 || { echo "python3 has no pip: apt-get install python3-pip" >&2; exit 1; }
  echo "installing Apache Flink $version (PyPI), its Kafka connector $connector and ZooKeeper $zookeeper (Maven Central) into $cache" >&2
  # Everything is fetched beside the old install, then swapped in with renames: a Flink cluster that
  # runs from the old one meanwhile keeps finding its files until it stops.
  fresh="$cache/new-$$"
  rm -rf "$fresh"
  mkdir -p "$fresh/dist" "$fresh/zookeeper"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$fresh/dist" \
    "apache-flink==$version" "apache-flink-libraries==$version" >&2
  home="$fresh/dist/pyflink"
  ls "$home/lib/flink-dist-$version.jar" "$home/bin/jobmanager.sh" >/dev/null
  mvn -q -B -f "$pom" -P flink dependency:copy-dependencies \
    -DexcludeTransitive=true -DoutputDirectory="$fresh/maven" >&2
  mv "$fresh/maven/flink-sql-connector-kafka-$connector.jar" "$home/lib/"
  mv "$fresh/maven/flink-sql-gateway-$version.jar" "$home/opt/"
  rmdir "$fresh/maven"
  mvn -q -B -f "$pom" -P zookeeper dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$fresh/zookeeper" >&2
  ls "$fresh/zookeeper/zookeeper-$zookeeper.jar" >/dev/null
  for part in dist zookeeper; do
    if [ -d "$cache/$part" ]; then
      mv "$cache/$part" "$fresh/old-$part"
    fi
    mv "$fresh/$part" "$cache/$part"
  done
  rm -rf "$fresh"
  rm -f "$cache"/.complete-*
  touch "$stamp"
fi
echo "$cache/dist/pyflink"
