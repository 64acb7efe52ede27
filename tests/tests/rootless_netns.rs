//! Rootless: an ordinary user with no capabilities runs switchyard for a namespace made with
//! `unshare --user --map-root-user --net` (as rootless containers and VMs make theirs). The
//! tap is created inside that namespace; NAT goes out through the user's sockets in the
//! "host" namespace (here one the test made, with its services on loopback and a veth to an
//! `outside` namespace), as pasta and slirp4netns do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};
use switchyard_tests::*;

const HOST_ADDR: &str = "203.0.113.3";
const OUTSIDE: &str = "203.0.113.1";
const GUEST: &str = "192.168.122.10";

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A web root with one file, served on `addr`:`port` by the command prefix `argv`.
fn http_server(ns: &Netns, argv: &[&str], dir: &TempDir, addr: &str, port: &str) -> Background {
    std::fs::create_dir_all(dir.0.join("www")).unwrap();
    dir.write("www/hello.txt", "hello, rootless\n");
    let script = format!(
        "import http.server, os, socketserver\n\
         os.chdir('{}')\n\
         class Server(socketserver.ThreadingTCPServer):\n\
         \x20   allow_reuse_address = True\n\
         Server(('{addr}', {port}), http.server.SimpleHTTPRequestHandler).serve_forever()\n",
        dir.file("www")
    );
    let mut full: Vec<&str> = argv.to_vec();
    full.extend(["python3", "-c", &script]);
    let server = ns.spawn(&full);
    wait_for(&format!("http {addr}:{port}"), || {
        let mut probe: Vec<&str> = argv.to_vec();
        probe.extend(["nc", "-z", "-w", "1", addr, port]);
        ns.run(&probe).status.success()
    });
    server
}

/// `argv` run (by root, then as whoever `argv` makes it) with a /dev/net/tun of mode 0666 in
/// a private mount namespace: Debian's udev makes it so, which a rootless user needs; where
/// this machine has it 0600, nothing outside changes.
fn with_open_tun(argv: Vec<String>) -> Vec<String> {
    let mut wrapped = vec![
        "sh".to_string(),
        "-c".to_string(),
        "mount -t tmpfs -o mode=755 none /dev/net && mknod -m 666 /dev/net/tun c 10 200 \
         && exec \"$@\""
            .to_string(),
        "sh".to_string(),
    ];
    wrapped.extend(argv);
    wrapped
}

#[test]
fn an_unprivileged_user_serves_a_user_namespace_through_host_sockets() {
    require(&[
        "ip", "unshare", "nsenter", "busybox", "dig", "curl", "iperf3", "python3", "nc",
    ]);
    let user = TestUser::new();
    let (uid, gid) = (user.uid.to_string(), user.gid.to_string());
    let dir = TempDir::new("syrl");
    must(&["chmod", "755", &dir.file("")]);
    // The user runs its own copy: the build directory may be private to root.
    let bin = dir.file("switchyard");
    std::fs::copy(switchyard_bin(), &bin).unwrap();
    must(&["chmod", "755", &bin]);
    let home = dir.file("home");
    std::fs::create_dir_all(&home).unwrap();
    must(&["chown", &format!("{uid}:{gid}"), &home]);

    // The "host": loopback services, one address, and ping sockets allowed for everyone.
    let host = Netns::new("h");
    let outside = Netns::new("o");
    host.veth_to("eth0", &outside, "eth0");
    host.set_static_address("eth0", &format!("{HOST_ADDR}/24"), None);
    outside.set_static_address("eth0", &format!("{OUTSIDE}/24"), None);
    host.must(&["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"]);
    let _stub = host.spawn(&["python3", "-c", STUB_DNS_SERVER, "127.0.0.1", "7"]);
    let _web = http_server(&host, &[], &dir, "127.0.0.1", "8001");
    let _iperf = host.spawn(&["iperf3", "-s", "-B", "127.0.0.1", "-p", "5201"]);
    let _echo = host.spawn(&[
        "python3",
        "-c",
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('127.0.0.1', 5300))\n\
         while True:\n\
         \x20   data, peer = s.recvfrom(2048)\n\
         \x20   s.sendto(b'echo:' + data, peer)\n",
    ]);

    // The user's namespace, as `unshare` (and rootless podman) make it.
    let as_user = |args: &[&str]| -> Vec<String> {
        user.argv(&uid, &gid, args)
            .into_iter()
            .map(str::to_string)
            .collect()
    };
    let sleeper = as_user(&[
        "unshare",
        "--user",
        "--map-root-user",
        "--net",
        "sleep",
        "600",
    ]);
    let sleeper: Vec<&str> = sleeper.iter().map(String::as_str).collect();
    let ns_holder = host.spawn(&sleeper);
    let pid = ns_holder.0.id().to_string();
    let own_userns = std::fs::read_link("/proc/self/ns/user").unwrap();
    wait_for("unshare", || {
        std::fs::read_link(format!("/proc/{pid}/ns/user")).is_ok_and(|ns| ns != own_userns)
    });
    let guest_ns = format!("/proc/{pid}/ns/net");

    let xml = dir.write(
        "default.xml",
        &format!(
            "<network xmlns:sy='urn:switchyard:network:1'>\n\
             <name>default</name>\n\
             <forward mode='nat'/>\n\
             <dns><forwarder addr='127.0.0.1'/></dns>\n\
             <ip address='192.168.122.1' netmask='255.255.255.0'>\n\
               <dhcp><range start='192.168.122.2' end='192.168.122.254'/>\n\
               <host mac='52:54:00:c0:00:0a' ip='{GUEST}'/></dhcp>\n\
             </ip>\n\
             <sy:host-loopback/>\n\
             <sy:forward proto='tcp' host='127.0.0.1:8080' guest='{GUEST}:80'/>\n\
             </network>\n"
        ),
    );
    let control = format!("{home}/ctl.sock");
    let tap = format!("tap0@{guest_ns}=52:54:00:c0:00:0a");
    let state = format!("XDG_STATE_HOME={home}/state");
    let runtime = format!("XDG_RUNTIME_DIR={home}");
    let args = [
        "run",
        xml.as_str(),
        "--json",
        "--tap",
        &tap,
        "--control",
        &control,
        "--resolv-conf",
        "/dev/null",
    ];
    let mut argv = vec!["env", state.as_str(), runtime.as_str(), bin.as_str()];
    argv.extend_from_slice(&args);
    let argv = as_user(&argv);
    let wrapped = with_open_tun(argv);
    let mut command = Command::new("ip");
    command.args(["netns", "exec", &host.name]).args(&wrapped);
    let mut sy = Switchyard::start_command(command);
    assert!(
        sy.log.iter().any(|l| l.contains("tap tap0 (created)")),
        "{:?}",
        sy.log
    );
    // The engine runs as the user, not as root.
    let status = std::fs::read_to_string(format!("/proc/{}/status", sy.pid())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().nth(1) == Some(uid.as_str()),
        "{uid_line}"
    );
    let cap_eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    assert!(cap_eff.ends_with("0000000000000000"), "{cap_eff}");

    // The guest side: the namespace's root (in its own user namespace) runs the clients.
    let guest = |args: &[&str]| -> Vec<String> {
        let mut v = vec![
            "nsenter",
            "-t",
            &pid,
            "-U",
            "-n",
            "--preserve-credentials",
            "--",
        ];
        v.extend_from_slice(args);
        as_user(&v)
    };
    let in_guest = |args: &[&str]| -> String {
        let argv = guest(args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        host.must(&argv)
    };
    in_guest(&["ip", "link", "set", "lo", "up"]);
    let script = udhcpc_script(&dir);
    // The script runs as the user and writes its lease note beside itself.
    must(&["chown", &format!("{uid}:{gid}"), &dir.file("")]);
    in_guest(&[
        "timeout", "30", "busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-i", "tap0",
        "-s", &script,
    ]);
    let lease = std::fs::read_to_string(format!("{script}.lease")).unwrap();
    assert_eq!(lease.trim(), format!("{GUEST} 192.168.122.1"));

    // DNS through the stub upstream on the host's loopback.
    let answer = in_guest(&[
        "dig",
        "+short",
        "+time=2",
        "@192.168.122.1",
        "www.example.test",
    ]);
    assert_eq!(answer.trim(), "198.51.100.7");

    // HTTP from a server on the host's loopback.
    let body = in_guest(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://192.168.122.1:8001/hello.txt",
    ]);
    assert_eq!(body, "hello, rootless\n");

    // iperf3 to a server on the host's loopback, both ways.
    for reverse in [false, true] {
        let mut args = vec![
            "timeout",
            "20",
            "iperf3",
            "-c",
            "192.168.122.1",
            "-p",
            "5201",
            "-t",
            "2",
            "-J",
        ];
        if reverse {
            args.push("-R");
        }
        let bps = iperf3_received_bps(&in_guest(&args));
        assert!(bps > 50e6, "reverse={reverse}: {bps} bit/s");
    }

    // A UDP flow and a ping, through the user's sockets.
    let reply = in_guest(&[
        "python3",
        "-c",
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(5)\n\
         s.sendto(b'hi', ('192.168.122.1', 5300))\n\
         print(s.recvfrom(2048)[0].decode())\n",
    ]);
    assert_eq!(reply.trim(), "echo:hi");
    let ping = in_guest(&["ping", "-c", "2", "-i", "0.2", "-W", "2", OUTSIDE]);
    assert!(ping.contains("2 received"), "{ping}");

    // A closed host port: the guest gets a RST at once.
    let started = Instant::now();
    let argv = guest(&["nc", "-z", "-w", "5", OUTSIDE, "9"]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    assert!(!host.run(&argv).status.success());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A port forwarded from the host's loopback to a server in the guest.
    let guest_argv = guest(&[]);
    let guest_argv: Vec<&str> = guest_argv.iter().map(String::as_str).collect();
    let _guest_web = http_server(&host, &guest_argv, &dir, GUEST, "80");
    let body = host.must(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://127.0.0.1:8080/hello.txt",
    ]);
    assert_eq!(body, "hello, rootless\n");

    let stats = sy.stop_json();
    let counters = &stats["engine"]["socket_nat"];
    assert_eq!(counters["tcp_refused"].as_u64(), Some(1), "{counters}");
    assert!(counters["port_forward_connections"].as_u64().unwrap() >= 1);
    assert!(counters["pings_in"].as_u64().unwrap() >= 2);
    // The lease file is the user's, under $XDG_STATE_HOME.
    let leases =
        std::fs::read_to_string(format!("{home}/state/switchyard/default.leases")).unwrap();
    assert!(leases.contains(GUEST), "{leases}");

    // The same user's daemon: a network defined with a tap in the user namespace, started,
    // leased on and used; its definition kept under $XDG_STATE_HOME, its socket under
    // $XDG_RUNTIME_DIR.
    let daemon_argv = as_user(&[
        "env",
        &state,
        &runtime,
        &bin,
        "daemon",
        "--resolv-conf",
        "/dev/null",
    ]);
    let wrapped = with_open_tun(daemon_argv);
    let wrapped: Vec<&str> = wrapped.iter().map(String::as_str).collect();
    let _daemon = host.spawn(&wrapped);
    let cli = |args: &[&str]| -> std::process::Output {
        let mut argv = vec!["env", runtime.as_str(), bin.as_str()];
        argv.extend_from_slice(args);
        let argv = as_user(&argv);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        run(&argv)
    };
    wait_for("the user's daemon", || cli(&["net-list"]).status.success());
    let defined = dir.write(
        "rl.xml",
        &format!(
            "<network xmlns:sy='urn:switchyard:network:1'>\n\
             <name>rl</name>\n\
             <forward mode='nat'/>\n\
             <ip address='192.168.122.1' netmask='255.255.255.0'>\n\
               <dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp>\n\
             </ip>\n\
             <sy:host-loopback/>\n\
             <sy:port type='tap' target='tap1' netns='{guest_ns}' mac='52:54:00:c0:00:0b'/>\n\
             </network>\n"
        ),
    );
    for args in [
        vec!["net-define", defined.as_str()],
        vec!["net-start", "rl"],
    ] {
        let out = cli(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    in_guest(&[
        "timeout", "30", "busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-i", "tap1",
        "-s", &script,
    ]);
    let body = in_guest(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://192.168.122.1:8001/hello.txt",
    ]);
    assert_eq!(body, "hello, rootless\n");
    assert!(std::path::Path::new(&format!("{home}/state/switchyard/networks/rl.xml")).exists());

    // The user ends the namespace's processes. The tap's fd, opened inside by the helper, is
    // then all that holds the namespace: switchyard sees nobody is left and lets the port go,
    // so the namespace ends (issue 11: a port whose namespace is deleted).
    let has_tap1 = || String::from_utf8_lossy(&cli(&["iface-list", "rl"]).stdout).contains("tap1");
    assert!(has_tap1());
    drop(_guest_web);
    drop(ns_holder);
    wait_for("the abandoned namespace's port to go", || !has_tap1());
    assert!(cli(&["net-destroy", "rl"]).status.success());
}
