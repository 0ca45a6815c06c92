#!/usr/bin/env bash
# The seed example for real, on a machine with NVIDIA GPUs, the NVIDIA container toolkit,
# Docker and access to Docker Hub and Hugging Face: a vLLM service with an http probe on
# /health, two replicas and a GPU range, as in reference/seed-service-probes.txt. It waits
# until both replicas are ready, asks the endpoint for a chat completion, checks that each
# replica saw its own GPUs, and prints one line: "gpu-seed-check: PASS ..." or "... FAIL ...".
#
#   usage: scripts/gpu-seed-check.sh [--dry-run] [--image] [MODEL] [REPLICAS] [GPU_SPEC]
#     --dry-run  validate and print the plan (GPUs matched, images, commands) and stop
#     --image    run vLLM's image (vllm/vllm-openai) instead of `python: 3.12` + `uv pip
#                install vllm` on dstack's base image (the seed's way, slower to start)
#     MODEL      default Qwen/Qwen2.5-0.5B-Instruct (ungated; the seed's Llama 3.1 needs
#                HF_TOKEN in the environment and access to the model)
#     REPLICAS   default 2;  GPU_SPEC  default 24GB..48GB (the seed's)
set -euo pipefail

DRY_RUN=0
USE_IMAGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --image) USE_IMAGE=1; shift ;;
        *) break ;;
    esac
done
MODEL="${1:-Qwen/Qwen2.5-0.5B-Instruct}"
REPLICAS="${2:-2}"
GPU_SPEC="${3:-24GB..48GB}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DSTACKCTL="${DSTACKCTL:-$ROOT/.venv/bin/dstackctl}"
export DSTACKCTL_HOME="${DSTACKCTL_HOME:-$(mktemp -d)}"
WORK="$(mktemp -d)"
NAME="seed-check"
PORT="$(( 30000 + RANDOM % 2000 ))"
export HF_TOKEN="${HF_TOKEN:-}"
trap '"$DSTACKCTL" stop "$NAME" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

verdict() { echo "gpu-seed-check: $*"; }

serve="vllm serve $MODEL --max-model-len 4096 --tensor-parallel-size \$DSTACK_GPUS_NUM"
if [ "$USE_IMAGE" = 1 ]; then
    runtime="image: vllm/vllm-openai:latest
commands:
  - $serve"
else
    runtime="python: \"3.12\"
commands:
  - uv pip install vllm
  - $serve"
fi
cat > "$WORK/seed.dstack.yml" <<YAML
type: service
name: $NAME
$runtime
env:
  - HF_TOKEN
port: "$PORT:8000"
model: $MODEL
probes:
  - type: http
    url: /health
    interval: 15s
replicas: $REPLICAS
resources:
  gpu: $GPU_SPEC
YAML

if ! "$DSTACKCTL" run --dry-run "$WORK/seed.dstack.yml"; then
    verdict "FAIL: the plan could not be made (see above: GPUs, image or env)"
    exit 1
fi
if [ "$DRY_RUN" = 1 ]; then
    verdict "DRY RUN: the plan above is what a real run would start"
    exit 0
fi

started=$SECONDS
if ! "$DSTACKCTL" run -d --timeout 30m "$WORK/seed.dstack.yml"; then
    "$DSTACKCTL" ps -v "$NAME" >&2 || true
    verdict "FAIL: the replicas did not get ready (ps -v above; \`dstackctl logs $NAME\` for vLLM's output)"
    exit 1
fi
ready_after=$(( SECONDS - started ))
"$DSTACKCTL" ps -v "$NAME"

body="$(printf '{"model": "%s", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}' "$MODEL")"
if ! answer="$(curl -fsS --max-time 120 -H 'Content-Type: application/json' -d "$body" \
    "http://127.0.0.1:$PORT/v1/chat/completions")"; then
    verdict "FAIL: the endpoint did not answer a chat completion"
    exit 1
fi
case "$answer" in
    *'"choices"'*) ;;
    *) verdict "FAIL: the chat completion's answer has no choices: ${answer:0:200}"; exit 1 ;;
esac

"$DSTACKCTL" ps "$NAME" --json > "$WORK/ps.json"
if ! gpus="$(python3 - "$WORK/ps.json" "$REPLICAS" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["runs"][0]["replicas"]
ready = [r for r in rows if r.get("ready")]
uuids = [g["uuid"] for r in ready for g in r.get("gpus", [])]
if len(ready) != int(sys.argv[2]) or not uuids or len(uuids) != len(set(uuids)):
    sys.exit(f"{len(ready)} ready replicas, GPUs {uuids}")
print(" ".join(f"replica={r['replica_num']}:{len(r['gpus'])}" for r in ready))
PY
)"; then
    verdict "FAIL: the replicas' GPUs are not what was asked (each its own, none shared)"
    exit 1
fi
verdict "PASS: $REPLICAS replicas of $MODEL ready in ${ready_after}s with GPUs $gpus; a chat completion answered through http://127.0.0.1:$PORT"
