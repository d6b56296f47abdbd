#!/usr/bin/env bash
# The main job: builds perchd and the example components, starts perchd on the simulated
# board (offline, no broker), deploys the examples through its local API and keeps running
# until Ctrl-C. Run it again and the agent starts the same components from its cache.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/perch/target}"
listen="${PERCH_LISTEN:-127.0.0.1:7070}"
state="${PERCH_STATE:-$repo/.perch}"
api="http://$listen"

cargo build --release -p perchd
scripts/build-examples.sh "$state/examples"

mkdir -p "$state"
cat > "$state/perchd.toml" <<TOML
data-dir = "$state/data"
listen = "$listen"
board = "sim"
TOML

"$CARGO_TARGET_DIR/release/perchd" --config "$state/perchd.toml" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid' INT TERM
for _ in $(seq 200); do curl -fs "$api/v1/health" >/dev/null && break; sleep 0.05; done
curl -fs "$api/v1/health" >/dev/null || { echo "perchd did not start" >&2; exit 1; }

deploy() { # name file query: skipped when the same bytes already run under that name
    local digest="sha256:$(sha256sum "$2" | cut -d' ' -f1)"
    if curl -fs "$api/v1/components/$1" | grep -q "\"digest\":\"$digest\""; then
        echo "  $1: already running from the cache"
    else
        curl -fsS -X PUT --data-binary "@$2" "$api/v1/components/$1?$3" >/dev/null
        echo "  $1: deployed"
    fi
}
echo "deploying the examples:"
deploy timer "$state/examples/timer.wasm" "every=5s&startup=true"
deploy hello "$state/examples/http-hello.wasm" "http=/hello"
deploy misbehave "$state/examples/misbehave.wasm" "message=misbehave.%3E&timeout=500ms&memory=16MiB"

cat <<TXT

perchd is running (pid $pid, data in $state/data). Try:
  curl $api/v1/status
  curl $api/hello
  curl $api/v1/components/timer/logs
  curl -X POST $api/v1/messages/misbehave.trap && curl $api/v1/components/misbehave
  curl $api/metrics
Ctrl-C stops it; run scripts/run.sh again and it starts the same components from its cache.
TXT
wait $pid
