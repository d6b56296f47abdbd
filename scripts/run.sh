#!/usr/bin/env bash
# The main job: builds perchd and the perch CLI, builds and signs the example components with
# `perch build`, starts perchd on the simulated board (offline, no broker) trusting only that
# signing key, deploys the examples with `perch deploy` and keeps running until Ctrl-C. Run it
# again and the agent starts the same components from its cache.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/perch/target}"
listen="${PERCH_LISTEN:-127.0.0.1:7070}"
state="${PERCH_STATE:-$repo/.perch}"
api="http://$listen"
# The demo's signing key lives with its state, not in the user's config dir.
export PERCH_CONFIG_DIR="$state/config"

cargo build --release -p perchd -p perch
perch="$CARGO_TARGET_DIR/release/perch"
mkdir -p "$state/examples"
"$perch" key show >/dev/null 2>&1 || "$perch" --quiet key new >/dev/null
key="$("$perch" key show)"
for example in timer http-hello misbehave thermostat; do
    # Guests build in their own target dir: another profile and target than the agent.
    CARGO_TARGET_DIR="$HOME/.cache/perch/examples-target" \
        "$perch" build "examples/$example" --out "$state/examples/$example.wasm"
done

cat > "$state/perchd.toml" <<TOML
data-dir = "$state/data"
listen = "$listen"
board = "sim"
boards-dir = ["$repo/board-configs"]

[signing]
trusted-keys = ["$key"]
TOML

"$CARGO_TARGET_DIR/release/perchd" --config "$state/perchd.toml" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid' INT TERM
for _ in $(seq 200); do curl -fs "$api/v1/health" >/dev/null && break; sleep 0.05; done
curl -fs "$api/v1/health" >/dev/null || { echo "perchd did not start" >&2; exit 1; }

echo "deploying the examples:"
for example in timer http-hello misbehave thermostat; do
    file="$state/examples/$example.wasm"
    digest="sha256:$(sha256sum "$file" | cut -d' ' -f1)"
    if curl -fs "$api/v1/components" | grep -q "\"digest\":\"$digest\""; then
        echo "  $example: already running from the cache"
    else
        "$perch" --quiet deploy "$file" --to "$api" >/dev/null
        echo "  $example: deployed"
    fi
done

cat <<TXT

perchd is running (pid $pid, data in $state/data). Try:
  $perch status --device $api
  $perch logs thermostat --device $api --follow
  curl $api/thermostat
  curl $api/hello
  curl $api/v1/telemetry?limit=5
  curl -X POST $api/v1/messages/misbehave.trap && $perch status --device $api
  curl $api/metrics
Ctrl-C stops it; run scripts/run.sh again and it starts the same components from its cache.
TXT
wait $pid
