#!/usr/bin/env bash
# Build the aicredits image with podman, without Docker Hub: the base is Debian bookworm made
# with debootstrap from the Debian mirror, everything else comes from PyPI and the npm registry.
#
#   scripts/build_image.sh [build]   make the base if missing, then build $IMAGE   (make image)
#   scripts/build_image.sh check     start $IMAGE, wait for /healthz, stop it       (make image-check)
#   scripts/build_image.sh base      only make the base image
#
# Needs root, podman and debootstrap (apt-get install -y podman debootstrap runc).
# Settings (environment):
#   IMAGE=localhost/aicredits:latest    the image to build / check
#   BASE_IMAGE=localhost/debian-base:bookworm
#   REFRESH_BASE=1                      debootstrap again (newer Debian packages in the base)
#   DEBIAN_MIRROR=http://deb.debian.org/debian
#   DEBIAN_SECURITY_MIRROR=http://deb.debian.org/debian-security
#   BUILD_CA=/etc/ssl/certs/ca-certificates.crt   CA bundle for the build's downloads (a
#                                       TLS-intercepting proxy's CA); mounted as a build
#                                       secret, never stored in the image. BUILD_CA= for none.
#   CHECK_REDIS_URL=redis://10.0.2.2:6379/15      Redis for the check; 10.0.2.2 is the
#                                       host's 127.0.0.1 as the container sees it.
#   CHECK_TIMEOUT=300                   seconds to wait for /healthz
# The debootstrapped tree and logs stay in .image-build/ (git- and docker-ignored).
set -euo pipefail

cd "$(dirname "$0")/.."
WORK=.image-build
IMAGE=${IMAGE:-localhost/aicredits:latest}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-base:bookworm}
SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BUILD_CA=${BUILD_CA-/etc/ssl/certs/ca-certificates.crt}
CHECK_REDIS_URL=${CHECK_REDIS_URL:-redis://10.0.2.2:6379/15}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-300}

say() { echo "[image] $*" >&2; }
die() { say "$*"; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 is not installed: apt-get install -y $2"; }

mkdir -p "$WORK"

# podman's defaults do not start a container in every sandbox. Seen on the project's machine
# (a VM whose root lacks CAP_SYS_RESOURCE; cgroup v1 with a cgroup2 hierarchy beside it):
#  - crun refuses hybrid cgroups ("cgroups in hybrid mode not supported, drop all controllers
#    from cgroupv2"), with or without --cgroups=disabled; runc works;
#  - podman asks for RLIMIT_NOFILE=1048576 (hard limit here 20000) and, when nofile is given,
#    RLIMIT_NPROC=1048576 (podman lowers its own to 32768 first). Raising a hard limit needs
#    CAP_SYS_RESOURCE: "setrlimit `RLIMIT_NOFILE`: Operation not permitted". Limits at or below
#    the current hard ones work.
# So: try the defaults, and fall back to runc with those limits.
OPTS=()
container_options() {  # $1: an image to probe with
  local probe=(podman run --rm --network none --no-healthcheck)
  if "${probe[@]}" "$1" true >/dev/null 2>"$WORK/probe.log"; then
    say "podman runs containers with its defaults"
    return
  fi
  local nofile nproc
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  [ "$nofile" = unlimited ] && nofile=1048576
  if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
  OPTS=(--runtime runc --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
  if "${probe[@]}" "${OPTS[@]}" "$1" true >/dev/null 2>>"$WORK/probe.log"
  then
    say "podman's defaults fail here ($(grep -m1 Error "$WORK/probe.log")); using ${OPTS[*]}"
    return
  fi
  die "podman cannot start a container here; see $WORK/probe.log"
}

make_base() {
  local rootfs="$WORK/rootfs-$SUITE"
  if [ "${REFRESH_BASE:-}" = 1 ]; then
    rm -rf "$rootfs" "$rootfs.done"
    podman image rm --force "$BASE_IMAGE" >/dev/null 2>&1 || true
  fi
  if podman image exists "$BASE_IMAGE"; then
    say "base $BASE_IMAGE exists (REFRESH_BASE=1 to make it again)"
    return
  fi
  if [ ! -f "$rootfs.done" ]; then
    need debootstrap debootstrap
    say "debootstrap $SUITE from $DEBIAN_MIRROR into $rootfs (log: $WORK/debootstrap.log)"
    rm -rf "$rootfs"
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
      || die "debootstrap failed; see $WORK/debootstrap.log"
    # The same sources as Debian's own images: the release, its updates and security.
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Nothing of this machine in the image: downloaded .debs, package lists, its DNS and name.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    : >"$rootfs/etc/resolv.conf"
    rm -f "$rootfs/etc/hostname"
    touch "$rootfs.done"
  fi
  say "importing $rootfs as $BASE_IMAGE"
  tar --numeric-owner -C "$rootfs" -c . | podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    - "$BASE_IMAGE" >/dev/null
}

build() {
  need podman podman
  make_base
  container_options "$BASE_IMAGE"
  local secret=()
  if [ -n "$BUILD_CA" ] && [ -f "$BUILD_CA" ]; then
    secret=(--secret "id=build_ca,src=$BUILD_CA")
  fi
  say "building $IMAGE from $BASE_IMAGE (log: $WORK/build.log)"
  local start=$SECONDS
  # --format docker keeps the HEALTHCHECK (the OCI format has no such field).
  if ! podman build --format docker "${OPTS[@]}" "${secret[@]}" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --tag "$IMAGE" . 2>&1 | tee "$WORK/build.log" \
    | { grep --line-buffered -E '^\[[0-9]+/[0-9]+\] STEP [0-9]+/[0-9]+: (FROM|RUN)|^Error' \
      | cut -c1-100 >&2 || true; }
  then
    tail -n 20 "$WORK/build.log" >&2
    die "the build failed; see $WORK/build.log"
  fi
  say "built $IMAGE in $((SECONDS - start)) s, $(podman image inspect --format '{{.Size}}' "$IMAGE" \
    | awk '{printf "%.0f MB", $1 / 1e6}')"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

CHECK_NAME="aicredits-image-check-$$"
check() {
  need podman podman
  need curl curl
  need slirp4netns slirp4netns
  if [ "$CHECK_REDIS_URL" = "redis://10.0.2.2:6379/15" ] \
    && ! redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
    die "no Redis on 127.0.0.1:6379: start it (scripts/services.sh) or set CHECK_REDIS_URL"
  fi
  podman image exists "$IMAGE" || die "no image $IMAGE: run scripts/build_image.sh (make image)"
  container_options "$IMAGE"
  local name=$CHECK_NAME port start answer
  port=$(free_port)
  # Production refuses dev defaults, so every required setting is given a clearly fake value:
  # nothing here reaches a real provider. SQLite (ALLOW_SQLITE_IN_PROD) keeps the check free of
  # a database server; Redis is the host's (slirp4netns reaches its loopback at 10.0.2.2).
  local env_file="$WORK/check.env"
  cat >"$env_file" <<EOF
PUBLIC_URL=https://aicredits-image-check.invalid
SESSION_SECRET=image-check-not-a-secret-$(printf '%040d' 0)
OIDC_ISSUER=https://idp.invalid
OIDC_CLIENT_ID=image-check
OIDC_CLIENT_SECRET=image-check
STRIPE_SECRET_KEY=sk_test_image_check_fake
STRIPE_WEBHOOK_SECRET=whsec_image_check_fake
OPENAI_API_KEY=image-check-fake
ALLOW_SQLITE_IN_PROD=true
REDIS_URL=$CHECK_REDIS_URL
EOF
  trap 'podman rm --force --time 5 "$CHECK_NAME" >/dev/null 2>&1 || true' EXIT
  say "starting $IMAGE as $name, port 3000 published on 127.0.0.1:$port"
  # --health-interval=disable: no timer (podman wants systemd for it, and says so on stderr);
  # `podman healthcheck run` below runs the image's HEALTHCHECK once instead.
  podman run --detach --name "$name" "${OPTS[@]}" --health-interval=disable \
    --network slirp4netns:allow_host_loopback=true --publish "127.0.0.1:$port:3000" \
    --env-file "$env_file" "$IMAGE" >/dev/null 2>"$WORK/run.log" \
    || { cat "$WORK/run.log" >&2; die "podman run failed"; }
  start=$SECONDS
  until answer=$(curl -fsS --max-time 3 "http://127.0.0.1:$port/healthz" 2>/dev/null); do
    if [ "$(podman inspect --format '{{.State.Running}}' "$name")" != true ]; then
      podman logs "$name" 2>&1 | tail -n 30 >&2
      die "the container stopped before /healthz answered"
    fi
    if [ $((SECONDS - start)) -ge "$CHECK_TIMEOUT" ]; then
      podman logs "$name" 2>&1 | tail -n 30 >&2
      die "no answer from /healthz after $CHECK_TIMEOUT s"
    fi
    sleep 2
  done
  say "/healthz answered after $((SECONDS - start)) s: $answer"
  say "GET / -> $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/")," \
    "/readyz -> $(curl -s "http://127.0.0.1:$port/readyz")"
  podman healthcheck run "$name" >/dev/null 2>>"$WORK/run.log" \
    || die "the image's HEALTHCHECK reports unhealthy"
  say "the image's HEALTHCHECK passes; running as $(podman exec "$name" id -un)"
  say "image check passed"
}

case "${1:-build}" in
  build) build ;;
  base) need podman podman; make_base ;;
  check) check ;;
  *) die "usage: $0 [build|check|base]" ;;
esac
