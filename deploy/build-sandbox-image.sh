#!/usr/bin/env bash
# Builds the execution image `python-executor-sandbox:latest` without any
# registry: a minimal Debian root filesystem made by mmdebstrap from the
# host's own apt sources, `docker import`ed, then deploy/Dockerfile.sandbox
# adds the sandbox user (1000:1000). `make docker-image` runs this.
#
#   bash deploy/build-sandbox-image.sh
#
# The rootfs tarball is cached (PYEXEC_CACHE_DIR, default
# ~/.cache/python-executor) under a name derived from the suite, packages and
# sources, and the imported base image is tagged with the same key, so a
# second build only runs the (cached) Dockerfile steps: a few seconds.
#
# Environment:
#   SANDBOX_SUITE      Debian suite (default: the host's VERSION_CODENAME)
#   SANDBOX_PACKAGES   comma-separated packages (default python3,ca-certificates)
#   SANDBOX_SOURCES    apt sources file(s) for mmdebstrap, space-separated
#                      (default: the host's files that list the suite)
#   SANDBOX_IMAGE      resulting tag (default python-executor-sandbox:latest)
#   PYEXEC_CACHE_DIR   cache directory
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
. /etc/os-release
suite=${SANDBOX_SUITE:-${VERSION_CODENAME:?set SANDBOX_SUITE}}
packages=${SANDBOX_PACKAGES:-python3,ca-certificates}
image=${SANDBOX_IMAGE:-python-executor-sandbox:latest}
cache=${PYEXEC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/python-executor}

host_sources() {
  # One-line (deb ... SUITE ...) and deb822 (Suites: ... SUITE ...) files that
  # name the suite as a whole word; disabled files (other suffixes) are skipped.
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    if grep -qE "^[[:space:]]*(deb[[:space:]].*|Suites:.*)[[:space:]]${suite}([[:space:]]|$)" "$f"; then
      echo "$f"
    fi
  done
}

read -r -a sources <<<"${SANDBOX_SOURCES:-$(host_sources | tr '\n' ' ')}"
if [ ${#sources[@]} -eq 0 ]; then
  echo "no apt sources for suite '$suite' found; set SANDBOX_SOURCES to a sources file" >&2
  exit 1
fi

command -v docker >/dev/null || { echo "docker CLI missing (apt-get install docker.io)" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "no Docker engine answers (bash scripts/start-dockerd.sh)" >&2; exit 1; }

key=$( { echo "$suite $packages"; cat "${sources[@]}"; } | sha256sum | cut -c1-16)
rootfs="$cache/sandbox-rootfs-$suite-$key.tar"
base="python-executor-sandbox-base:$key"
start=$SECONDS

if ! docker image inspect "$base" >/dev/null 2>&1; then
  if [ ! -f "$rootfs" ]; then
    rm -rf "$rootfs" "$rootfs.partial"
    if ! command -v mmdebstrap >/dev/null; then
      [ "$(id -u)" -eq 0 ] || { echo "mmdebstrap missing (apt-get install mmdebstrap)" >&2; exit 1; }
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
    fi
    mkdir -p "$cache"
    echo "building the $suite rootfs with mmdebstrap (sources: ${sources[*]})"
    # --dpkgopt/--aptopt keep the image small: no docs, no apt lists.
    mmdebstrap --variant=minbase --include="$packages" \
      --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
      --format=tar "$suite" "$rootfs.partial" "${sources[@]}"
    mv "$rootfs.partial" "$rootfs"
  else
    echo "using the cached rootfs $rootfs"
  fi
  docker import --change 'CMD ["/usr/bin/python3"]' "$rootfs" "$base" >/dev/null
fi

# The legacy builder needs nothing beyond the engine (no buildx plugin); its
# deprecation notice is only shown when the build fails.
buildlog=$(mktemp)
trap 'rm -f "$buildlog"' EXIT
if ! DOCKER_BUILDKIT=0 docker build --build-arg "BASE=$base" -t "$image" \
    -f "$here/Dockerfile.sandbox" "$here" >"$buildlog" 2>&1; then
  cat "$buildlog" >&2
  exit 1
fi
echo "built $image from $base in $(( SECONDS - start ))s"
docker run --rm --network none "$image" python3 -c 'import os, sys; print(sys.version.split()[0], os.getuid(), os.getcwd())'
