#!/usr/bin/env bash
# Builds a tiny Linux guest for the VM test: Debian's cloud kernel and static busybox
# (packages unpacked here, not installed) and an initramfs with the virtio-net modules and an
# /init that takes a DHCP lease on eth0, pings the router the lease names, prints the result
# on the serial console and powers off. Output: OUT/vmlinuz and OUT/initrd.gz (kept: built once).
# Usage: tests/vm/build.sh OUT
set -euo pipefail
out=${1:?usage: $0 OUT}
[ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] && exit 0
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image/ {print $2; exit}')
apt-get download -q "$kpkg" busybox-static >/dev/null 2>&1
dpkg -x ./linux-image-*.deb kernel
dpkg -x ./busybox-static_*.deb bb
kver=$(ls kernel/lib/modules)
mkdir -p root/bin root/lib/modules root/proc root/sys root/dev root/etc
cp bb/bin/busybox root/bin/busybox
for m in virtio/virtio virtio/virtio_ring virtio/virtio_pci_modern_dev virtio/virtio_pci_legacy_dev \
         virtio/virtio_pci; do
  cp "kernel/lib/modules/$kver/kernel/drivers/$m.ko" root/lib/modules/
done
cp "kernel/lib/modules/$kver/kernel/net/core/failover.ko" root/lib/modules/
cp "kernel/lib/modules/$kver/kernel/drivers/net/net_failover.ko" root/lib/modules/
cp "kernel/lib/modules/$kver/kernel/drivers/net/virtio_net.ko" root/lib/modules/
cat > root/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover \
         net_failover virtio_net; do
  insmod /lib/modules/$m.ko
done
cat > /bin/dhcp-event <<'EV'
#!/bin/sh
case "$1" in
  bound) ip addr add "$ip/$mask" dev "$interface"; echo "$router" > /router
         echo "VM-LEASE $ip router $router" ;;
esac
EV
chmod +x /bin/dhcp-event
ip link set lo up
ip link set eth0 up
udhcpc -f -q -n -t 10 -T 1 -i eth0 -s /bin/dhcp-event -x hostname:tinyvm
if [ -s /router ] && ping -c 3 -W 2 "$(cat /router)"; then echo "VM-PING-OK"; else echo "VM-PING-FAIL"; fi
echo "VM-DONE"
poweroff -f
INIT
chmod +x root/init
(cd root && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd.gz"
cp "kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
