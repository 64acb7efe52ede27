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

    // The first guest's tap is deleted from inside its namespace.
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

/// Waits until the running network has `n` ports.
fn wait_ports(control: &str, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats_of(control)["ports"].as_array().unwrap().len() != n {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// Issue 11's faults: "a port whose kernel side disappears (namespace deleted, tap removed) ...
// the engine keeps serving every other port and recovers the failed one when it returns".
#[test]
fn a_port_whose_namespace_or_tap_comes_back_is_attached_again() {
    require(&["ip", "ping"]);
    let dir = TempDir::new("syback");
    let sw = Netns::new("s");
    let guests: Vec<Netns> = (0..3).map(|_| Netns::new("g")).collect();
    // The third guest's tap is persistent, made before switchyard attaches to it.
    guests[2].must(&["ip", "tuntap", "add", "dev", "vm0", "mode", "tap"]);
    let control = dir.file("ctl.sock");
    let args = [
        "run".to_string(),
        "--control".into(),
        control.clone(),
        "--tap".into(),
        guests[0].tap_arg("eth0", "52:54:00:fb:00:01"),
        "--tap".into(),
        guests[1].tap_arg("eth0", "52:54:00:fb:00:02"),
        "--tap".into(),
        guests[2].tap_arg("vm0", "52:54:00:fb:00:03"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _sy = Switchyard::start_in(Some(&sw), &args);
    guests[0].set_static_address("eth0", "192.168.122.10/24", None);
    guests[1].set_static_address("eth0", "192.168.122.11/24", None);
    guests[2].set_static_address("vm0", "192.168.122.12/24", None);
    guests[1].must(&["ping", "-c", "1", "-W", "2", "192.168.122.10"]);

    // The guest's namespace is deleted: its tap was made outside and moved in, so nothing
    // of switchyard's holds the namespace, and the port goes with it.
    must(&["ip", "netns", "del", &guests[0].name]);
    wait_ports(
        &control,
        2,
        "the port of the deleted namespace was never removed",
    );
    guests[1].must(&["ping", "-c", "1", "-W", "2", "192.168.122.12"]);
    // The guest comes back under the same name: its tap is made there again, same MAC.
    must(&["ip", "netns", "add", &guests[0].name]);
    wait_ports(
        &control,
        3,
        "the port was not made again in the new namespace",
    );
    let link = guests[0].must(&["ip", "link", "show", "eth0"]);
    assert!(link.contains("52:54:00:fb:00:01"), "{link}");
    guests[0].set_static_address("eth0", "192.168.122.10/24", None);
    guests[0].must(&["ping", "-c", "1", "-W", "2", "192.168.122.11"]);

    // The persistent tap is deleted, then made again by its owner: attached again.
    guests[2].must(&["ip", "link", "del", "vm0"]);
    wait_ports(
        &control,
        2,
        "the deleted persistent tap's port was never removed",
    );
    guests[2].must(&["ip", "tuntap", "add", "dev", "vm0", "mode", "tap"]);
    wait_ports(&control, 3, "the persistent tap was not attached again");
    guests[2].set_static_address("vm0", "192.168.122.12/24", None);
    guests[2].must(&["ping", "-c", "1", "-W", "2", "192.168.122.11"]);
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

/// The dnsmasq-format lease file, line by line: (MAC, IP). Panics on a line that is not whole,
/// which is what "never corrupt" means.
fn parse_leases(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.len(), 5, "a broken lease line: {line:?}");
            assert!(fields[0].parse::<u64>().is_ok(), "{line:?}");
            assert_eq!(fields[1].len(), 17, "{line:?}");
            assert!(fields[2].parse::<std::net::Ipv4Addr>().is_ok(), "{line:?}");
            (fields[1].to_string(), fields[2].to_string())
        })
        .collect()
}

// kill -9 at moments spread over DHCP exchanges, five times over: the lease file is always
// whole, and every lease a client was acknowledged is in it (an ACK leaves only once its
// lease is on disk).
#[test]
fn kill_9_in_the_middle_of_dhcp_never_loses_an_acknowledged_lease() {
    require(&["ip", "busybox"]);
    let dir = TempDir::new("sykill");
    let state = dir.file("state");
    let sw = Netns::new("s");
    let guests: Vec<Netns> = (0..3).map(|_| Netns::new("g")).collect();
    let macs: Vec<String> = (1..=3).map(|i| format!("52:54:00:6b:00:{i:02x}")).collect();
    for g in &guests {
        // Persistent taps: they outlive each killed engine, and the clients with them.
        g.must(&["ip", "tuntap", "add", "dev", "eth0", "mode", "tap"]);
    }
    let xml = dir.write(
        "net.xml",
        "<network><name>kill</name><ip address='192.168.122.1' netmask='255.255.255.0'>\
         <dhcp><range start='192.168.122.100' end='192.168.122.150'/></dhcp></ip></network>",
    );
    let scripts: Vec<String> = (0..3)
        .map(|i| {
            let events = dir.file(&format!("events-{i}"));
            let script = dir.write(
                &format!("udhcpc-{i}.sh"),
                &format!(
                    "#!/bin/sh\ncase \"$1\" in\n  bound|renew) ip -4 addr flush dev \"$interface\"\n\
                     ip addr add \"$ip/$mask\" dev \"$interface\"\n\
                     echo \"$ip\" >> {events} ;;\nesac\nexit 0\n"
                ),
            );
            must(&["chmod", "755", &script]);
            script
        })
        .collect();
    let mut acknowledged: Vec<Option<String>> = vec![None; 3];
    for round in 0..5u64 {
        let mut args = vec![
            "run".to_string(),
            xml.clone(),
            "--control".into(),
            dir.file("ctl.sock"),
            "--state-dir".into(),
            state.clone(),
        ];
        for (g, mac) in guests.iter().zip(&macs) {
            args.push("--tap".into());
            args.push(g.tap_arg("eth0", mac));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut sy = Switchyard::start_in(Some(&sw), &args);
        let clients: Vec<Background> = guests
            .iter()
            .zip(&scripts)
            .map(|(g, script)| {
                g.spawn(&[
                    "timeout", "10", "busybox", "udhcpc", "-f", "-q", "-n", "-t", "3", "-T", "1",
                    "-i", "eth0", "-s", script,
                ])
            })
            .collect();
        // A different moment each round, from before the first DISCOVER to after the ACKs.
        std::thread::sleep(Duration::from_millis(round * 90 + 20));
        let (ok, _, _) = sy.stop_with("KILL");
        assert!(!ok, "killed");
        drop(clients);
        let file = std::fs::read_to_string(format!("{state}/kill.leases")).unwrap_or_default();
        let leases = parse_leases(&file);
        for (i, mac) in macs.iter().enumerate() {
            let events =
                std::fs::read_to_string(dir.file(&format!("events-{i}"))).unwrap_or_default();
            if let Some(ip) = events.lines().last() {
                acknowledged[i] = Some(ip.to_string());
            }
            if let Some(ip) = &acknowledged[i] {
                assert!(
                    leases.contains(&(mac.clone(), ip.clone())),
                    "round {round}: {mac} was acknowledged {ip}, the file has:\n{file}"
                );
            }
        }
    }
    assert!(
        acknowledged.iter().all(Option::is_some),
        "some client never got a lease in five rounds: {acknowledged:?}"
    );
}
