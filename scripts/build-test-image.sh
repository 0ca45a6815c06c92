#!/usr/bin/env bash
# Build the test image dstackctl-testsrv:latest from images/testsrv/.
# There is no registry: the image is FROM scratch and holds only Debian's static busybox
# (/bin/busybox from package busybox-static), copied into a temporary build context
# together with the files of images/testsrv. Unchanged inputs hit the build cache.
set -euo pipefail

IMAGE="dstackctl-testsrv:latest"
BUSYBOX="/bin/busybox"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/images/testsrv"

log() { printf 'build-test-image: %s\n' "$*"; }
die() { printf 'build-test-image: error: %s\n' "$*" >&2; exit 1; }

is_static() {
    # ldd (libc-bin, always on Debian) works where `file` is not installed.
    local out
    out="$(LC_ALL=C ldd "$1" 2>&1 || true)"
    case "$out" in
        *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
        *) return 1 ;;
    esac
}

[ -x "$BUSYBOX" ] || die "$BUSYBOX is missing: install Debian package busybox-static (scripts/setup.sh does)"
is_static "$BUSYBOX" || die "$BUSYBOX is dynamically linked and cannot run FROM scratch: install busybox-static"
command -v docker >/dev/null || die "docker CLI not found: install Debian package docker.io (scripts/setup.sh does)"

context="$(mktemp -d "${TMPDIR:-/tmp}/dstackctl-testsrv.XXXXXX")"
trap 'rm -rf "$context"' EXIT
cp -R "$SRC/." "$context/"
cp "$BUSYBOX" "$context/busybox"

log "building $IMAGE from images/testsrv"
# The legacy builder of Debian's docker.io prints a deprecation notice on stderr: show
# stderr only when the build fails.
errors="$(mktemp "${TMPDIR:-/tmp}/dstackctl-testsrv-build.XXXXXX")"
trap 'rm -rf "$context" "$errors"' EXIT
if ! image_id="$(docker build -q --force-rm -t "$IMAGE" "$context" 2>"$errors")"; then
    cat "$errors" >&2
    die "docker build of $IMAGE failed"
fi
# Rebuilds leave the previous image untagged; drop those (dangling ones only).
docker image prune -f --filter "label=dstackctl.test-image=1" >/dev/null
log "built $IMAGE (${image_id#sha256:})"
