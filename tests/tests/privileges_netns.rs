//! Least privilege: a switchyard started as root keeps only the capabilities a running network
//! may use, can never gain more (no-new-privs), and answers on its control socket only to its
//! own user (or root), even where the socket's permissions were loosened.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use switchyard_tests::*;

/// CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_NET_RAW (13), CAP_SYS_ADMIN (21).
const KEPT: u64 = (1 << 10) | (1 << 12) | (1 << 13) | (1 << 21);

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

#[test]
fn a_root_run_keeps_four_capabilities_no_new_privileges_and_its_socket_to_itself() {
    let dir = TempDir::new("sypriv");
    let g = Netns::new("g");
    let control = dir.file("ctl.sock");
    let tap = g.tap_arg("eth0", "52:54:00:77:00:01");
    let sy = Switchyard::start(&["run", "--control", &control, "--tap", &tap]);
    let pid = sy.pid();
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let value = u64::from_str_radix(&status_field(pid, set), 16).unwrap();
        assert_eq!(value, KEPT, "{set} is {value:#x}");
    }
    assert_eq!(status_field(pid, "CapInh"), "0000000000000000");
    // It still does its work: the tap it made answers through the gateway.
    g.set_static_address("eth0", "192.168.122.50/24", None);
    g.must(&["ping", "-c", "1", "-W", "2", "192.168.122.1"]);

    // Another user, let in by loosened permissions, is still refused.
    let user = TestUser::new();
    must(&["chmod", "755", &dir.file("")]);
    must(&["chmod", "666", &control]);
    let bin = dir.file("switchyard");
    std::fs::copy(switchyard_bin(), &bin).unwrap();
    must(&["chmod", "755", &bin]);
    let (uid, gid) = (user.uid.to_string(), user.gid.to_string());
    let argv = user.argv(&uid, &gid, &[&bin, "stats", "--socket", &control]);
    let out = run(&argv);
    assert!(!out.status.success(), "another user read the stats");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("permission denied"), "{stderr}");
    // Root (and the owner) still may.
    must(&[
        switchyard_bin().to_str().unwrap(),
        "stats",
        "--socket",
        &control,
    ]);
}
