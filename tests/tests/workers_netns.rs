//! `--workers 2`: multi-queue taps, a fast-path worker for queue 1 of every tap, the engine
//! for queue 0 and for everything the worker hands over. Real guests in namespaces, real
//! `ping`, `udhcpc` and `iperf3`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use switchyard_tests::{
    Netns, Switchyard, TempDir, must, port_counters, require, stats_of, udhcpc_script, unique_name,
};

const MACS: [&str; 3] = [
    "52:54:00:5f:00:01",
    "52:54:00:5f:00:02",
    "52:54:00:5f:00:03",
];

fn three_guests(control: &str) -> ([Netns; 3], Switchyard) {
    let guests = [Netns::new("w"), Netns::new("w"), Netns::new("w")];
    let taps = switchyard_tests::tap_args(&guests, &MACS);
    let sy = Switchyard::start(&[
        "run",
        "--json",
        "--workers",
        "2",
        "--control",
        control,
        "--tap",
        &taps[0],
        "--tap",
        &taps[1],
        "--tap",
        &taps[2],
    ]);
    (guests, sy)
}

#[test]
fn two_workers_share_the_taps_switch_known_unicast_and_leave_the_rest_to_the_engine() {
    require(&["ip", "ping", "iperf3", "busybox"]);
    let dir = TempDir::new("workers");
    let control = dir.file("sy.sock");
    let (guests, mut sy) = three_guests(&control);
    let [a, b, c] = &guests;
    for ns in &guests {
        let link = ns.must(&["ip", "-d", "link", "show", "dev", "eth0"]);
        assert!(
            link.contains("multi_queue numqueues 2"),
            "a tap with a queue per worker: {link}"
        );
    }

    // DHCP (broadcast, to the gateway), ARP and ping to the gateway reach the engine from
    // whichever queue the kernel picked.
    let script = udhcpc_script(&dir);
    for ns in &guests {
        ns.udhcpc("eth0", &script, &[]);
        ns.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.122.1"]);
    }
    let address = |ns: &Netns| {
        let out = ns.must(&["ip", "-4", "-br", "addr", "show", "dev", "eth0"]);
        out.split_whitespace()
            .find_map(|w| w.strip_suffix("/24").map(str::to_string))
            .expect("a leased address")
    };
    let b_ip = address(b);
    a.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", &b_ip]);
    c.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", &b_ip]);

    // TCP streams a -> b: the kernel spreads flows over both queues; until the worker has
    // switched some of them (each flow lands on queue 1 with probability 1/2), run more.
    let (_, c_before) = c.rx_counters("eth0");
    let mut sent = 0;
    for round in 0..5 {
        let port = (5301 + round).to_string();
        let _server = b.spawn(&["iperf3", "-s", "-1", "-p", &port]);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let out = a.must(&[
            "iperf3", "-c", &b_ip, "-p", &port, "-t", "1", "-P", "8", "-J",
        ]);
        let report: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
        sent += report["end"]["sum_received"]["bytes"]
            .as_u64()
            .expect("bytes received");
        if stats_of(&control)["engine"]["worker_forwarded"]
            .as_u64()
            .unwrap()
            > 1000
        {
            break;
        }
    }
    let (_, c_after) = c.rx_counters("eth0");
    assert!(sent > 10_000_000, "iperf3 moved too little: {sent} bytes");
    // Learned unicast reaches only its port, whichever thread switched it.
    assert!(
        c_after - c_before < 64 * 1024,
        "third guest saw {} bytes",
        c_after - c_before
    );

    let stats = sy.stop_json();
    let engine = &stats["engine"];
    let by_workers = engine["worker_forwarded"].as_u64().unwrap();
    assert!(by_workers > 1000, "the worker switched frames: {stats}");
    assert!(
        engine["worker_handed_over"].as_u64().unwrap() > 0,
        "DHCP, ARP and pings to the gateway from queue 1 went to the engine: {stats}"
    );
    assert!(
        engine["forwarded"].as_u64().unwrap() > by_workers,
        "the engine switched the flows of queue 0: {stats}"
    );
    // The workers' counts are in the ports' counters: what b was sent is what a sent it.
    let a_rx = port_counters(&stats, 0)["rx_bytes"].as_u64().unwrap();
    let b_tx = port_counters(&stats, 1)["tx_bytes"].as_u64().unwrap();
    assert!(
        a_rx >= sent && b_tx >= sent,
        "a rx {a_rx}, b tx {b_tx}, sent {sent}"
    );
    assert_eq!(port_counters(&stats, 1)["drop_handover_full"], 0);
    assert_eq!(engine["dhcp"]["acks"], 3, "{stats}");
    // The worker's own line: the same counts, and the frames it handled itself.
    let worker = &stats["workers"][0];
    assert_eq!(worker["queue"], 1, "{stats}");
    assert_eq!(worker["forwarded"], engine["worker_forwarded"], "{stats}");
    assert_eq!(
        worker["handed_over"], engine["worker_handed_over"],
        "{stats}"
    );
    assert!(
        worker["rx_packets"].as_u64().unwrap() >= by_workers,
        "{stats}"
    );
    assert!(
        worker["tx_packets"].as_u64().unwrap() >= by_workers,
        "{stats}"
    );
}

/// What `benches/WORKERS.md` relies on: tun sends a flow's frames to the queue userspace last
/// wrote that flow's frames to (by the symmetric flow hash), so once a TCP stream between two
/// guests runs, both its directions stay with one thread, whichever the kernel first picked.
#[test]
fn a_tcp_stream_between_guests_stays_with_one_thread_both_ways() {
    require(&["ip", "ping", "iperf3", "ss"]);
    let dir = TempDir::new("sticky");
    let control = dir.file("sy.sock");
    let (guests, _sy) = three_guests(&control);
    let [a, b, _] = &guests;
    a.set_static_address("eth0", "192.168.122.10/24", None);
    b.set_static_address("eth0", "192.168.122.11/24", None);
    a.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.122.11"]);
    let frames = |stats: &serde_json::Value| {
        let ports = (0..2)
            .map(|i| port_counters(stats, i)["rx_packets"].as_u64().unwrap())
            .sum::<u64>();
        let worker = &stats["workers"][0];
        let read = worker["rx_packets"].as_u64().unwrap() + worker["handed_over"].as_u64().unwrap();
        (ports, read)
    };
    // Each stream lands on the worker's queue with probability 1/2: until two have, in 16.
    let mut on_worker = 0;
    for round in 0..16 {
        let port = (5401 + round).to_string();
        let _server = b.spawn(&["iperf3", "-s", "-1", "-p", &port]);
        b.wait_listening(5401 + round);
        let (ports_before, worker_before) = frames(&stats_of(&control));
        a.must(&["iperf3", "-c", "192.168.122.11", "-p", &port, "-t", "1"]);
        let (ports_after, worker_after) = frames(&stats_of(&control));
        let all = ports_after - ports_before;
        let worker = worker_after - worker_before;
        assert!(all > 200, "round {round}: {all} frames");
        // iperf3's control connection is a flow of its own, and ARP or IPv6 chatter goes to
        // the engine: a few dozen frames either way.
        let minority = worker.min(all.saturating_sub(worker));
        assert!(
            minority <= (all * 3 / 100).max(200),
            "round {round}: the worker read {worker} of the stream's {all} frames"
        );
        if worker > all / 2 {
            on_worker += 1;
            if on_worker == 2 {
                break;
            }
        }
    }
    assert!(
        on_worker > 0,
        "no stream landed on the worker's queue in 16"
    );
}

#[test]
fn a_guest_that_goes_away_leaves_both_threads_and_the_others_keep_talking() {
    require(&["ip", "ping"]);
    let control = std::env::temp_dir()
        .join(format!("{}.sock", unique_name("syw")))
        .to_string_lossy()
        .into_owned();
    let (guests, mut sy) = three_guests(&control);
    let [a, b, c] = &guests;
    for (i, ns) in guests.iter().enumerate() {
        let cidr = format!("192.168.122.{}/24", 10 + i);
        ns.must(&["ip", "addr", "add", &cidr, "dev", "eth0"]);
    }
    a.must(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "192.168.122.12"]);
    let b_name = b.name.clone();
    must(&["ip", "netns", "del", &b_name]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stats = stats_of(&control);
        let ports = stats["ports"].as_array().unwrap().len();
        if ports == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "port of {b_name} not removed: {stats}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    a.must(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "192.168.122.12"]);
    c.must(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "192.168.122.10"]);
    let (ok, _, stderr) = sy.stop_with("TERM");
    assert!(ok, "clean stop: {stderr}");
}
