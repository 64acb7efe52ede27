//! The soak shared by `soak_netns` (socket NAT) and `soak_packet_nat_netns`: mixed load on
//! the default network's shape (NAT, DHCP, DNS) for a bounded time (1 minute under CI, 10
//! minutes otherwise, or `SWITCHYARD_SOAK_SECS`): iperf3 through NAT, a churn of short TCP
//! connections, DHCP renew and release/rebind churn, DNS queries from several guests. The
//! engine's resident memory and open fds are sampled every 5 s; they must level off, the
//! churn must not fail, and no frame may be dropped as a transmit error.

use std::time::{Duration, Instant};
use switchyard_tests::*;

const OUTSIDE: &str = "203.0.113.1";

fn soak_secs() -> u64 {
    if let Some(secs) = std::env::var("SWITCHYARD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return secs;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        60
    } else {
        600
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Short TCP connections to argv[1]:argv[2] for argv[3] seconds: connect, send, read the
/// echo, close. Prints "ok failed".
const CHURN: &str = r#"
import socket, sys, time
end = time.time() + float(sys.argv[3])
ok = failed = 0
while time.time() < end:
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        s.sendall(b"x" * 100)
        got = b""
        while len(got) < 100:
            chunk = s.recv(100 - len(got))
            if not chunk:
                break
            got += chunk
        s.close()
        ok += len(got) == 100
        failed += len(got) != 100
    except OSError:
        failed += 1
print(ok, failed)
"#;

/// An echo server for the churn: each connection gets back what it sends.
const ECHO_SERVER: &str = r#"
import socket, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("203.0.113.1", 7000))
srv.listen(512)
def serve(c):
    try:
        while True:
            data = c.recv(4096)
            if not data:
                break
            c.sendall(data)
    finally:
        c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Runs the soak with `forward` as the network's NAT (`<forward>` and any `sy:` elements);
/// returns switchyard's final counters. `reuse_time_wait`: the churning guest reuses its
/// ports in TIME_WAIT (`tcp_tw_reuse`), for a churn faster than its ports last.
pub fn soak(forward: &str, reuse_time_wait: bool) -> serde_json::Value {
    require(&["ip", "busybox", "dig", "iperf3", "python3", "nc"]);
    let secs = soak_secs();
    let dir = TempDir::new("sysoak");
    let outside = Netns::new("o");
    let sw = Netns::new("s");
    sw.veth_to("eth0", &outside, "eth0");
    sw.set_static_address("eth0", "203.0.113.3/24", None);
    outside.set_static_address("eth0", &format!("{OUTSIDE}/24"), None);
    let _iperf = outside.spawn(&["iperf3", "-s", "-B", OUTSIDE]);
    let _echo = outside.spawn(&["python3", "-c", ECHO_SERVER]);
    let xml = dir.write(
        "default.xml",
        &format!(
            "<network xmlns:sy='urn:switchyard:network:1'>\n<name>default</name>\n{forward}\n\
             <domain name='lab'/>\n\
             <dns><host ip='192.168.122.7'><hostname>printer</hostname></host></dns>\n\
             <ip address='192.168.122.1' netmask='255.255.255.0'>\n\
               <dhcp><range start='192.168.122.100' end='192.168.122.150'/></dhcp>\n\
             </ip>\n</network>\n"
        ),
    );
    let guests: Vec<Netns> = (0..3).map(|_| Netns::new("g")).collect();
    let control = dir.file("ctl.sock");
    let mut args = vec![
        "run".to_string(),
        xml,
        "--json".into(),
        "--control".into(),
        control.clone(),
        // Two threads: the worker hands the engine every frame of DHCP, DNS and packet NAT's
        // new connections, translates packet NAT's established ones itself and carries the
        // socket NAT TCP connections that open on its queue, so the hand-over, both threads'
        // lifetimes, NAT's mirror and the worker's socket NAT are soaked too.
        "--workers".into(),
        "2".into(),
    ];
    for (i, g) in guests.iter().enumerate() {
        args.push("--tap".into());
        args.push(g.tap_arg("eth0", &format!("52:54:00:50:00:{:02x}", i + 1)));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut sy = Switchyard::start_in(Some(&sw), &args);
    let pid = sy.pid();
    let script = udhcpc_script(&dir);
    let pidfile = dir.file("udhcpc.pid");
    for g in &guests[..2] {
        g.udhcpc("eth0", &script, &[]);
    }
    // The third guest keeps its client running, for renew and release churn.
    let _udhcpc = guests[2].spawn_udhcpc("eth0", &script, &pidfile, "churner");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::path::Path::new(&pidfile).exists()
        || !guests[2]
            .must(&["ip", "-4", "addr"])
            .contains("192.168.122.")
    {
        assert!(Instant::now() < deadline, "the churning guest never leased");
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !outside
        .run(&["nc", "-z", "-w", "1", OUTSIDE, "7000"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "echo server never listened");
        std::thread::sleep(Duration::from_millis(100));
    }

    let duration = secs.to_string();
    let iperf = guests[0].spawn(&[
        "timeout",
        &(secs + 30).to_string(),
        "iperf3",
        "-c",
        OUTSIDE,
        "-t",
        &duration,
        "-b",
        "1G",
    ]);
    if reuse_time_wait {
        guests[1].must(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse"]);
    }
    let churn_out = dir.file("churn.out");
    let churn = guests[1].spawn(&[
        "sh",
        "-c",
        &format!(
            "python3 -c '{}' {OUTSIDE} 7000 {secs} > {churn_out}",
            CHURN.replace('\'', "'\\''")
        ),
    ]);

    let started = Instant::now();
    let mut samples = Vec::new();
    let (mut queries, mut answered, mut renews) = (0u32, 0u32, 0u32);
    let udhcpc_pid = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .to_string();
    let mut next_sample = started;
    while started.elapsed() < Duration::from_secs(secs) {
        if Instant::now() >= next_sample {
            samples.push((
                started.elapsed().as_secs(),
                status_kib(pid, "VmRSS"),
                open_fds(pid),
            ));
            next_sample += Duration::from_secs(5);
        }
        for g in &guests {
            queries += 1;
            let out = g.run(&[
                "dig",
                "+short",
                "+time=1",
                "+tries=1",
                "@192.168.122.1",
                "printer.lab",
            ]);
            answered += u32::from(String::from_utf8_lossy(&out.stdout).trim() == "192.168.122.7");
        }
        // Renew (unicast REQUEST); every fifth time release first, so the lease is rebound.
        renews += 1;
        if renews % 5 == 0 {
            let _ = run(&["kill", "-USR2", &udhcpc_pid]);
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = run(&["kill", "-USR1", &udhcpc_pid]);
        std::thread::sleep(Duration::from_millis(300));
    }
    samples.push((
        started.elapsed().as_secs(),
        status_kib(pid, "VmRSS"),
        open_fds(pid),
    ));
    let deadline = Instant::now() + Duration::from_secs(40);
    while !std::fs::read_to_string(&churn_out).is_ok_and(|s| !s.trim().is_empty()) {
        assert!(Instant::now() < deadline, "the churn never finished");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(churn);
    drop(iperf);
    let churned = std::fs::read_to_string(&churn_out).unwrap();
    let mut churned = churned
        .split_whitespace()
        .map(|n| n.parse::<u64>().unwrap());
    let (ok, failed) = (churned.next().unwrap(), churned.next().unwrap());

    eprintln!("soak {secs} s: (seconds, VmRSS KiB, open fds):");
    for (t, rss, fds) in &samples {
        eprintln!("  {t:>4} {rss:>8} {fds:>4}");
    }
    eprintln!(
        "short connections {ok} ok, {failed} failed; DNS {answered}/{queries}; {renews} renews"
    );
    assert!(ok > secs * 20, "only {ok} short connections in {secs} s");
    assert_eq!(failed, 0, "short connections failed");
    assert!(
        answered * 100 >= queries * 99,
        "DNS answered {answered} of {queries}"
    );
    // Levelled off: the last sample within 30% (plus 8 MiB) of the largest after warm-up, and
    // as many fds as after warm-up, give or take the connections in flight.
    let warm = samples.len() / 4;
    let warm_rss = samples[warm..samples.len() - 1]
        .iter()
        .map(|s| s.1)
        .max()
        .unwrap_or(0)
        .max(samples[warm].1);
    let (_, last_rss, last_fds) = *samples.last().unwrap();
    assert!(
        last_rss <= warm_rss * 13 / 10 + 8192,
        "RSS still growing: {samples:?}"
    );
    assert!(last_fds <= samples[warm].2 + 64, "fds growing: {samples:?}");
    let stats = sy.stop_json();
    for port in stats["ports"].as_array().unwrap() {
        let counters = &port[1]["counters"];
        assert_eq!(counters["drop_tx_error"].as_u64(), Some(0), "{port}");
    }
    stats
}
