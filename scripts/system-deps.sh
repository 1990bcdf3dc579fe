#!/usr/bin/env bash
# Installs the Debian packages the embedded sandbox needs, when they are missing.
set -euo pipefail
need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v slirp4netns >/dev/null || need+=(slirp4netns)
command -v ip >/dev/null || need+=(iproute2)
# the firewall of sandboxes with network on (loaded into their namespace with nsenter)
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need+=(nftables)
# pyseccomp loads libseccomp.so.2 at runtime
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || need+=(libseccomp2)
# the zygote's native part (sandbox/zygote_native.c) is built on the host at first use
command -v cc >/dev/null || need+=(gcc)
[ -f /usr/include/linux/seccomp.h ] && [ -f /usr/include/stdio.h ] || need+=(libc6-dev)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing system packages: ${need[*]} (install them as root: apt-get install ${need[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null
