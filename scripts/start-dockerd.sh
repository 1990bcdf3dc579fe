#!/usr/bin/env bash
# Starts a Docker engine in the background when none answers, then waits until
# `docker info` works. Idempotent: a running engine is left alone.
#
#   bash scripts/start-dockerd.sh            # install docker.io if missing, start, wait
#
# Environment:
#   DOCKERD_LOG        where dockerd logs (default /var/log/python-executor-dockerd.log)
#   DOCKERD_TIMEOUT    seconds to wait for the engine (default 60)
#   DOCKER_HOST        the socket to check (default the standard one)
set -euo pipefail

log=${DOCKERD_LOG:-/var/log/python-executor-dockerd.log}
timeout=${DOCKERD_TIMEOUT:-60}

answers() { docker info >/dev/null 2>&1; }

if command -v docker >/dev/null && answers; then
  echo "docker engine already running"
  exit 0
fi

if ! command -v dockerd >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "dockerd missing; install it as root: apt-get install docker.io" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq docker.io >/dev/null
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "no docker engine answers and starting one needs root" >&2
  exit 1
fi

# A stale pid file from a dead engine makes dockerd refuse to start.
pidfile=/var/run/docker.pid
if [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  rm -f "$pidfile"
fi

if ! { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }; then
  mkdir -p "$(dirname "$log")"
  echo "starting dockerd (log: $log)"
  # setsid: the engine outlives this script and the shell that ran it.
  setsid dockerd >>"$log" 2>&1 </dev/null &
fi

start=$SECONDS
until answers; do
  if (( SECONDS - start >= timeout )); then
    echo "dockerd did not answer within ${timeout}s; last log lines:" >&2
    tail -n 30 "$log" >&2 || true
    exit 1
  fi
  sleep 0.5
done
echo "docker engine ready after $(( SECONDS - start ))s ($(docker info --format '{{.ServerVersion}} {{.Driver}} cgroup v{{.CgroupVersion}}'))"
