#!/usr/bin/env bash
# Installs what switchyard's tests, demo and benchmarks run: the tools people use
# (ip, ping, iperf3, tcpdump, udhcpc, dhclient, dhcpcd, dig, nc, curl, traceroute, iptables),
# and what the rootless test uses (unshare, nsenter, setpriv, useradd). Debian/Ubuntu, as root.
set -euo pipefail

declare -A package_of=(
  [ip]=iproute2 [ping]=iputils-ping [iperf3]=iperf3 [tcpdump]=tcpdump [busybox]=busybox
  [dig]=dnsutils [dhclient]=isc-dhcp-client [nc]=netcat-openbsd [curl]=curl [pgrep]=procps
  [iptables]=iptables [traceroute]=traceroute [python3]=python3 [sha256sum]=coreutils
  [dhcpcd]=dhcpcd-base [dnsmasq]=dnsmasq-base [cpio]=cpio [qemu-system-x86_64]=qemu-system-x86
  [unshare]=util-linux [nsenter]=util-linux [setpriv]=util-linux [useradd]=passwd
)
missing=()
for tool in "${!package_of[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${package_of[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${missing[*]}; run as root (sudo) so they can be installed" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz (the fuzz targets' smoke run)" >&2
  cargo install --quiet --locked cargo-fuzz
fi
