#!/usr/bin/env bash
# End-to-end GPU check for a machine with NVIDIA GPUs, the NVIDIA container toolkit and
# access to a registry: starts a service whose replicas run `nvidia-smi -L`, then verifies
# that each replica sees exactly the GPUs dstackctl assigned to it (from `ps --json`).
#   usage: scripts/gpu-check.sh [GPU_SPEC] [REPLICAS] [IMAGE]
#   e.g.   scripts/gpu-check.sh 1 2      # two replicas with one GPU each
set -euo pipefail

SPEC="${1:-1}"
REPLICAS="${2:-2}"
IMAGE="${3:-nvidia/cuda:12.4.1-base-ubuntu22.04}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DSTACKCTL="${DSTACKCTL:-$ROOT/.venv/bin/dstackctl}"
export DSTACKCTL_HOME="${DSTACKCTL_HOME:-$(mktemp -d)}"
WORK="$(mktemp -d)"
NAME="gpu-check"
trap '"$DSTACKCTL" stop "$NAME" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

nvidia-smi -L || { echo "gpu-check: nvidia-smi does not work on this machine" >&2; exit 1; }

cat > "$WORK/gpu-check.dstack.yml" <<YAML
type: service
name: $NAME
image: $IMAGE
commands:
  - nvidia-smi -L
  - echo DSTACK_GPUS_NUM=\$DSTACK_GPUS_NUM
  - sleep infinity
port: "$(( 30000 + RANDOM % 2000 )):8000"
replicas: $REPLICAS
probes: []
resources:
  gpu: $SPEC
YAML

"$DSTACKCTL" run --dry-run "$WORK/gpu-check.dstack.yml"
"$DSTACKCTL" run -d --timeout 10m "$WORK/gpu-check.dstack.yml"
sleep 2  # let nvidia-smi print before reading the logs
"$DSTACKCTL" ps -v "$NAME"
"$DSTACKCTL" ps "$NAME" --json > "$WORK/ps.json"

status=0
for num in $(seq 0 $(( REPLICAS - 1 ))); do
    "$DSTACKCTL" logs "$NAME" --replica "$num" > "$WORK/replica-$num.log"
    seen="$(grep -o 'UUID: GPU-[0-9a-f-]*' "$WORK/replica-$num.log" | sed 's/UUID: //' | sort | tr '\n' ' ')"
    assigned="$(python3 - "$WORK/ps.json" "$num" <<'PY'
import json, sys
runs = json.load(open(sys.argv[1]))["runs"]
replica = next(r for r in runs[0]["replicas"] if r["replica_num"] == int(sys.argv[2]))
print(" ".join(sorted(g["uuid"] for g in replica["gpus"])), end=" ")
PY
)"
    gpus_num="$(grep -o 'DSTACK_GPUS_NUM=[0-9]*' "$WORK/replica-$num.log" | cut -d= -f2)"
    if [ "$seen" = "$assigned" ] && [ "$gpus_num" = "$(wc -w <<< "$seen" | tr -d ' ')" ]; then
        echo "gpu-check: replica=$num OK: sees exactly its GPUs: $seen(DSTACK_GPUS_NUM=$gpus_num)"
    else
        echo "gpu-check: replica=$num MISMATCH: assigned [$assigned] but nvidia-smi -L lists [$seen], DSTACK_GPUS_NUM=$gpus_num" >&2
        status=1
    fi
done
exit "$status"
