//! A real VM on a stream port: QEMU (software emulation) boots Debian's cloud kernel with a
//! busybox initramfs (built by tests/vm/build.sh, once) whose network is
//! `-netdev stream,...,addr.path=SOCKET` to switchyard; the guest takes a DHCP lease from the
//! gateway and pings it, and the lease shows up in `net-dhcp-leases`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use switchyard_tests::*;

#[test]
fn a_qemu_vm_on_a_stream_port_gets_a_lease_and_pings_the_gateway() {
    require(&["qemu-system-x86_64", "cpio", "apt-get", "dpkg"]);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let images = repo.join("target/vm");
    must(&[
        &repo.join("tests/vm/build.sh").display().to_string(),
        &images.display().to_string(),
    ]);
    let dir = TempDir::new("syvm");
    let sw = Netns::new("s");
    let socket = dir.file("vm.sock");
    let xml = dir.write(
        "net.xml",
        // A NAT network, as VMs usually get: its DHCP names the gateway as router, which the
        // VM pings (an isolated network names none).
        "<network><name>vmnet</name><forward mode='nat'/>\
         <ip address='192.168.122.1' netmask='255.255.255.0'>\
         <dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp></ip></network>",
    );
    let control = dir.file("ctl.sock");
    let _sy = Switchyard::start_in(
        Some(&sw),
        &["run", &xml, "--stream", &socket, "--control", &control],
    );
    let netdev = format!("stream,id=n0,server=off,addr.type=unix,addr.path={socket}");
    let console = must(&[
        "timeout",
        "110",
        "qemu-system-x86_64",
        "-m",
        "256",
        "-nographic",
        "-no-reboot",
        "-kernel",
        &images.join("vmlinuz").display().to_string(),
        "-initrd",
        &images.join("initrd.gz").display().to_string(),
        "-append",
        "console=ttyS0 panic=-1 quiet",
        "-netdev",
        &netdev,
        "-device",
        "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
    ]);
    assert!(
        console.contains("VM-LEASE 192.168.122.") && console.contains("VM-PING-OK"),
        "{console}"
    );
    let bin = switchyard_bin().display().to_string();
    let leases = must(&[&bin, "net-dhcp-leases", "--socket", &control]);
    assert!(
        leases
            .lines()
            .any(|l| l.contains("52:54:00:12:34:56") && l.contains("tinyvm")),
        "{leases}"
    );
}
