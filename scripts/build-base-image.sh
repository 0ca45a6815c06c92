#!/usr/bin/env bash
# Build dstackctl-python:latest, a stand-in for dstack's base image (dstackai/base) made
# without a container registry: a minimal Debian bookworm from Debian's own packages
# (mmdebstrap, to a tarball, then `docker import`), with
#   - python3 (bookworm's 3.11; also as `python`, as on dstack's image even without a
#     `python:` venv), python3-venv, bash, curl, ca-certificates, apt;
#   - uv in /usr/local/bin, taken from its PyPI wheel (the binary only), which the prelude
#     of `python:` configs needs (`uv venv -p X --seed /dstack/venv`);
#   - this machine's CA bundle as /etc/ssl/certs/ca-certificates.crt, with UV_SYSTEM_CERTS=1
#     and SSL_CERT_FILE pointing at it: containers reach the package index here only when
#     they trust that bundle. (UV_SYSTEM_CERTS is uv's name for what UV_NATIVE_TLS did;
#     uv 0.11 and later print a deprecation warning on every command that sees UV_NATIVE_TLS,
#     a line that would take a place in every log tail dstackctl shows.)
# Run replicas on it with DSTACK_DOCKER_BASE_IMAGE=dstackctl-python:latest.
#
# The image carries the sha256 of its recipe (this script and the CA bundle it copies) in
# label dstackctl.base-image.recipe: when dstackctl-python:latest already has that label the
# script does nothing (one `docker image ls`); an edit of this script or a new CA bundle
# rebuilds it. uv cannot download interpreters here: UV_PYTHON_DOWNLOADS=never makes a
# `python:` other than the image's fail at once with uv's "No interpreter found" message.
# Needs root (mmdebstrap's root mode; apt-get install mmdebstrap when it is missing).
set -euo pipefail

IMAGE="dstackctl-python:latest"
SUITE="bookworm"
MIRROR="http://deb.debian.org/debian"
SECURITY_MIRROR="http://deb.debian.org/debian-security"
PACKAGES="python3,python3-venv,python-is-python3,bash,curl,ca-certificates"
UV_VERSION="0.13.9"
HOST_CA_BUNDLE="/etc/ssl/certs/ca-certificates.crt"
RECIPE_LABEL="dstackctl.base-image.recipe"
MARK_LABEL="dstackctl.base-image"
LOCK_FILE="${TMPDIR:-/tmp}/dstackctl-build-base-image.lock"
SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

log() { printf 'build-base-image: %s\n' "$*"; }
die() { printf 'build-base-image: error: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "docker CLI not found: install Debian package docker.io (scripts/setup.sh does)"
[ -r "$HOST_CA_BUNDLE" ] || die "$HOST_CA_BUNDLE is missing: install Debian package ca-certificates"

recipe="$(cat "$SELF" "$HOST_CA_BUNDLE" | sha256sum)"
recipe="${recipe%% *}"

up_to_date() {
    [ -n "$(docker image ls -q --filter "reference=$IMAGE" --filter "label=$RECIPE_LABEL=$recipe")" ]
}

if up_to_date; then
    log "$IMAGE is up to date (recipe ${recipe:0:12})"
    exit 0
fi

# One build at a time (setup.sh in CI and a developer's run may overlap); whoever waited
# finds the image built.
exec 9>"$LOCK_FILE"
flock 9
if up_to_date; then
    log "$IMAGE is up to date (recipe ${recipe:0:12}), built while waiting for $LOCK_FILE"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "building $IMAGE needs root (mmdebstrap in root mode)"
if ! command -v mmdebstrap >/dev/null; then
    log "installing mmdebstrap with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
fi

case "$(uname -m)" in
    x86_64) wheel_platform="manylinux_2_17_x86_64" ;;
    aarch64) wheel_platform="manylinux_2_17_aarch64" ;;
    *) die "no uv wheel platform known for $(uname -m)" ;;
esac

started=$SECONDS
work="$(mktemp -d "${TMPDIR:-/tmp}/dstackctl-python-base.XXXXXX")"
trap 'rm -rf "$work"' EXIT

log "building $IMAGE (recipe ${recipe:0:12}): Debian $SUITE, uv $UV_VERSION"
# uv: the binary from its wheel (pip keeps the download in its cache for the next build).
if ! python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --platform "$wheel_platform" --dest "$work/wheel" "uv==$UV_VERSION" >"$work/pip.log" 2>&1; then
    cat "$work/pip.log" >&2
    die "pip download uv==$UV_VERSION failed"
fi
python3 - "$work/wheel" "$work/bin" <<'EOF'
import pathlib, sys, zipfile
wheels = list(pathlib.Path(sys.argv[1]).glob("uv-*.whl"))
assert len(wheels) == 1, wheels
out = pathlib.Path(sys.argv[2])
out.mkdir()
with zipfile.ZipFile(wheels[0]) as wheel:
    for name in wheel.namelist():
        if name.endswith(("/scripts/uv", "/scripts/uvx")):
            target = out / name.rsplit("/", 1)[1]
            target.write_bytes(wheel.read(name))
            target.chmod(0o755)
EOF
[ -x "$work/bin/uv" ] || die "no uv binary in the uv $UV_VERSION wheel"
cp "$HOST_CA_BUNDLE" "$work/ca-certificates.crt"

# The tree: Debian's `apt` variant (the Essential packages and apt) and $PACKAGES, no docs,
# man pages or translations; merged /usr by symlinks as debootstrap makes it (not package
# usrmerge, which brings perl); apt's lists and caches are dropped by mmdebstrap's clean-up.
# The customize hooks run after every package is installed, so the host's bundle replaces the
# one update-ca-certificates generated. (~1 minute on 2 cores, mostly unpacking and dpkg.)
# shellcheck disable=SC2016 # "$1" is expanded by mmdebstrap's hooks: the tree's root
if ! mmdebstrap --quiet --mode=root --variant=apt --format=tar \
        --include="$PACKAGES" \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt=force-unsafe-io \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --customize-hook="cp '$work/bin/uv' '$work/bin/uvx' \"\$1/usr/local/bin/\"" \
        --customize-hook="cp '$work/ca-certificates.crt' \"\$1/etc/ssl/certs/ca-certificates.crt\"" \
        --customize-hook='rm -f "$1"/var/log/*.log "$1"/var/log/apt/*' \
        "$SUITE" "$work/rootfs.tar" \
        "deb $MIRROR $SUITE main" \
        "deb $MIRROR $SUITE-updates main" \
        "deb $SECURITY_MIRROR $SUITE-security main" \
        >"$work/mmdebstrap.log" 2>&1; then
    tail -n 30 "$work/mmdebstrap.log" >&2
    die "mmdebstrap failed"
fi

bundle="/etc/ssl/certs/ca-certificates.crt"
image_id="$(docker import \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV UV_SYSTEM_CERTS=1" \
    --change "ENV UV_PYTHON_DOWNLOADS=never" \
    --change "ENV SSL_CERT_FILE=$bundle" \
    --change "ENV REQUESTS_CA_BUNDLE=$bundle" \
    --change "ENV PIP_CERT=$bundle" \
    --change "LABEL $MARK_LABEL=1" \
    --change "LABEL $RECIPE_LABEL=$recipe" \
    --change 'CMD ["/bin/bash"]' \
    "$work/rootfs.tar" "$IMAGE")"
# The image this one replaces is left untagged: drop it (dangling ones only; one that a
# container still uses stays).
docker image prune -f --filter "label=$MARK_LABEL=1" >/dev/null
size="$(docker image inspect -f '{{.Size}}' "$IMAGE")"
log "built $IMAGE (${image_id#sha256:}) in $((SECONDS - started))s, $((size / 1000000)) MB"
