//! Faults: a guest's tap deleted under the engine, a full disk under the lease file.
//! The engine keeps serving every other port, never acknowledges a lease it could not write,
//! and never leaves a partial lease file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};
use switchyard_tests::*;

/// CPU time (user + system, in clock ticks) the process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_deleted_guest_tap_leaves_the_other_ports_served() {
    require(&["ip", "ping"]);
    let dir = TempDir::new("syfault");
    let sw = Netns::new("s");
    let guests: Vec<Netns> = (0..3).map(|_| Netns::new("g")).collect();
    let control = dir.file("ctl.sock");
    let mut args = vec!["run".to_string(), "--control".into(), control.clone()];
    for (i, g) in guests.iter().enumerate() {
        args.push("--tap".into());
        args.push(g.tap_arg("eth0", &format!("52:54:00:fa:00:{:02x}", i + 1)));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sy = Switchyard::start_in(Some(&sw), &args);
    for (i, g) in guests.iter().enumerate() {
        g.set_static_address("eth0", &format!("192.168.122.{}/24", 10 + i), None);
    }
    guests[1].must(&["ping", "-c", "1", "-W", "2", "192.168.122.10"]);

    // The first guest's tap is deleted from inside its namespace. (Deleting the namespace
    // alone would not do it: the tap's fd, opened there, keeps the namespace alive.)
    guests[0].must(&["ip", "link", "del", "eth0"]);
    let (g2, g3) = (&guests[1], &guests[2]);
    // Traffic towards the gone guest makes the engine notice, if the kernel did not say.
    let _ = g2.run(&["ping", "-c", "1", "-W", "1", "192.168.122.10"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats_of(&control)["ports"].as_array().unwrap().len() != 2 {
        assert!(Instant::now() < deadline, "the dead port was never removed");
        std::thread::sleep(Duration::from_millis(100));
    }
    g2.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.122.12"]);
    g3.must(&["ping", "-c", "1", "-W", "2", "192.168.122.1"]);
    // And it does not spin on the dead fd.
    let before = cpu_ticks(sy.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(sy.pid()) - before;
    assert!(used < 20, "{used} ticks of CPU in 2 s idle");
}

/// A tmpfs of its own for the lease file, unmounted on drop.
struct SmallDisk(String);

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = run(&["umount", "-l", &self.0]);
    }
}

#[test]
fn a_full_disk_withholds_acks_and_the_lease_file_stays_whole() {
    require(&["ip", "busybox", "mount", "dd"]);
    let dir = TempDir::new("sydisk");
    let state = dir.file("state");
    std::fs::create_dir_all(&state).unwrap();
    must(&["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", &state]);
    let _disk = SmallDisk(state.clone());
    let sw = Netns::new("s");
    let guests: Vec<Netns> = (0..2).map(|_| Netns::new("g")).collect();
    let xml = dir.write(
        "net.xml",
        "<network><name>disk</name><ip address='192.168.122.1' netmask='255.255.255.0'>\
         <dhcp><range start='192.168.122.100' end='192.168.122.150'/></dhcp></ip></network>",
    );
    let control = dir.file("ctl.sock");
    let (t1, t2) = (
        guests[0].tap_arg("eth0", "52:54:00:d1:00:01"),
        guests[1].tap_arg("eth0", "52:54:00:d1:00:02"),
    );
    let mut sy = Switchyard::start_in(
        Some(&sw),
        &[
            "run",
            &xml,
            "--control",
            &control,
            "--state-dir",
            &state,
            "--tap",
            &t1,
            "--tap",
            &t2,
        ],
    );
    let script = udhcpc_script(&dir);
    guests[0].udhcpc("eth0", &script, &[]);
    let leases = format!("{state}/disk.leases");
    let before = std::fs::read_to_string(&leases).unwrap();
    assert!(before.contains("52:54:00:d1:00:01"), "{before}");

    // The disk fills up: the second guest's lease cannot be written, so it is never ACKed.
    let _ = run(&["dd", "if=/dev/zero", &format!("of={state}/fill"), "bs=4096"]);
    let refused = guests[1].run(&[
        "timeout", "20", "busybox", "udhcpc", "-f", "-q", "-n", "-t", "3", "-T", "1", "-i", "eth0",
        "-s", &script,
    ]);
    assert!(
        !refused.status.success(),
        "a lease was acknowledged without being written"
    );
    assert_eq!(
        std::fs::read_to_string(&leases).unwrap(),
        before,
        "the file changed"
    );
    assert!(!std::path::Path::new(&format!("{leases}.new")).exists());

    // Space again: the held write goes through, and the guest gets its lease.
    std::fs::remove_file(format!("{state}/fill")).unwrap();
    guests[1].udhcpc("eth0", &script, &[]);
    let after = std::fs::read_to_string(&leases).unwrap();
    assert!(
        after.contains("52:54:00:d1:00:01") && after.contains("52:54:00:d1:00:02"),
        "{after}"
    );
    let (_, _, log) = sy.stop_with("TERM");
    assert!(log.contains("cannot write the lease file"), "{log}");
    assert!(log.contains("is written again"), "{log}");
}
