#!/usr/bin/env bash
# Prepare this machine for dstackctl's tests; safe to run again and again.
#   1. Debian packages docker.io and busybox-static, when missing;
#   2. a running dockerd (started in the background when `docker info` fails);
#   3. the virtualenv .venv with dstackctl installed editable, with test extras;
#   4. the test image dstackctl-testsrv:latest (scripts/build-test-image.sh);
#   5. the base image dstackctl-python:latest for `python:` services
#      (scripts/build-base-image.sh: ~1 minute when its recipe changed, nothing otherwise).
# Needs root for steps 1, 2 and 5 when they have something to do.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKERD_LOG="/var/log/dstackctl-dockerd.log"
DOCKERD_WAIT_SECONDS=60
DOCKERD_PIDFILE="/var/run/docker.pid"
CONTAINERD_PIDFILE="/var/run/docker/containerd/containerd.pid"

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

static_busybox() {
    # ldd (libc-bin, always on Debian) works where `file` is not installed.
    local out
    [ -x /bin/busybox ] || return 1
    out="$(LC_ALL=C ldd /bin/busybox 2>&1 || true)"
    case "$out" in
        *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
        *) return 1 ;;
    esac
}

# 1. Packages.
packages=()
if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    packages+=(docker.io)
fi
if ! static_busybox; then
    packages+=(busybox-static)
fi
if [ "${#packages[@]}" -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "need root to install ${packages[*]}"
    log "installing ${packages[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    static_busybox || die "/bin/busybox is still not a static binary after installing busybox-static"
else
    log "docker.io and busybox-static already installed"
fi

# 2. Docker engine.
# Print the pid in pidfile $1 when it is a live (not zombie) process named $2.
live_pid() {
    local pid state
    pid="$(cat "$1" 2>/dev/null)" || return 1
    case "$pid" in '' | *[!0-9]*) return 1 ;; esac
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    state="$(sed -n "s/^[0-9]* ($2) \\([A-Z]\\).*/\\1/p" "/proc/$pid/stat" 2>/dev/null)"
    [ "$state" != Z ] || return 1
    printf '%s\n' "$pid"
}

# dockerd refuses to start while its pidfile names a process that still exists, and
# waits in vain for a containerd whose pidfile names one (a killed daemon not yet reaped,
# or a pid reused since): remove such pidfiles.
remove_stale_pidfile() {
    if [ -e "$1" ] && ! live_pid "$1" "$2" >/dev/null; then
        log "removing stale $1"
        rm -f "$1"
    fi
}

if docker info >/dev/null 2>&1; then
    log "docker engine is running"
else
    [ "$(id -u)" -eq 0 ] || die "the docker engine is not reachable and only root can start dockerd"
    if dockerd_pid="$(live_pid "$DOCKERD_PIDFILE" dockerd)"; then
        log "dockerd (pid $dockerd_pid) is running but not answering yet; waiting for it"
    else
        remove_stale_pidfile "$DOCKERD_PIDFILE" dockerd
        remove_stale_pidfile "$CONTAINERD_PIDFILE" containerd
        log "starting dockerd in the background (log: $DOCKERD_LOG)"
        # setsid + nohup: dockerd outlives this script and its session.
        setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
        dockerd_pid=$!
    fi
    started=$SECONDS
    until docker info >/dev/null 2>&1; do
        if ! kill -0 "$dockerd_pid" 2>/dev/null; then
            tail -n 5 "$DOCKERD_LOG" >&2 || true
            die "dockerd exited during start-up; see $DOCKERD_LOG"
        fi
        if [ $((SECONDS - started)) -ge "$DOCKERD_WAIT_SECONDS" ]; then
            tail -n 5 "$DOCKERD_LOG" >&2 || true
            die "dockerd did not answer within ${DOCKERD_WAIT_SECONDS}s; see $DOCKERD_LOG"
        fi
        sleep 0.5
    done
    log "docker engine is up after $((SECONDS - started))s"
fi

# 3. Virtualenv.
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
fi
log "installing dstackctl (editable, with test extras) into .venv"
# pip's output (and the build backend's editable-install warning) only when it fails.
pip_log="$(mktemp "${TMPDIR:-/tmp}/dstackctl-pip.XXXXXX")"
# compat mode puts the source folder on sys.path with a plain .pth line; the default editable
# mode installs an import hook that costs every dstackctl command ~10-30 ms of start-up.
if ! .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' \
        --config-settings editable_mode=compat >"$pip_log" 2>&1; then
    cat "$pip_log" >&2
    rm -f "$pip_log"
    die "pip install -e '.[test]' failed"
fi
rm -f "$pip_log"
# An editable install ships no bytecode, and where PYTHONDONTWRITEBYTECODE is set (it is on
# these machines) every command would compile dstackctl's modules again (~50 ms for
# `validate`, more for an agent). A wheel install compiles them once; do the same.
.venv/bin/python -m compileall -q dstackctl >/dev/null || die "compiling dstackctl's modules failed"

# 4. Test image.
"$ROOT/scripts/build-test-image.sh"

# 5. Base image for `python:` services (DSTACK_DOCKER_BASE_IMAGE=dstackctl-python:latest).
"$ROOT/scripts/build-base-image.sh"
log "done"
