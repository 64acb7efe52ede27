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

/// A thread of a running switchyard: its name, the CPUs it may run on, its scheduling
/// policy and real-time priority (proc(5): `status`, `stat` fields 40 and 41).
#[derive(Debug)]
struct ThreadPlace {
    name: String,
    cpus: String,
    policy: u32,
    priority: u32,
}

fn threads_of(pid: u32) -> Vec<ThreadPlace> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        let status = read("status");
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let stat = read("stat");
        // Fields after the parenthesised name (which may hold spaces), from field 3 on.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0);
        threads.push(ThreadPlace {
            name: read("comm").trim().to_string(),
            cpus,
            priority: field(40),
            policy: field(41),
        });
    }
    threads
}

/// Two guests at .10 and .11 on a switchyard started with `args`, its control socket at
/// `control`.
fn two_guests_run(args: &[&str], control: &str) -> ([Netns; 2], Switchyard) {
    let guests = [Netns::new("w"), Netns::new("w")];
    let taps = switchyard_tests::tap_args(&guests, &MACS[..2]);
    let mut argv = args.to_vec();
    argv.extend_from_slice(&["--control", control, "--tap", &taps[0], "--tap", &taps[1]]);
    let sy = Switchyard::start(&argv);
    for (ns, ip) in guests
        .iter()
        .zip(["192.168.122.10/24", "192.168.122.11/24"])
    {
        ns.set_static_address("eth0", ip, None);
    }
    (guests, sy)
}

#[test]
fn cpus_and_realtime_place_the_datapath_threads_and_leave_the_others_alone() {
    require(&["ip", "ping"]);
    let allowed = switchyard_tests::allowed_cpus();
    let (engine_cpu, worker_cpu) = (*allowed.last().unwrap(), allowed[0]);
    let dir = TempDir::new("placed");
    let control = dir.file("sy.sock");
    let cpus = format!("{engine_cpu},{worker_cpu}");
    let (guests, sy) = two_guests_run(
        &["run", "--workers", "2", "--cpus", &cpus, "--realtime", "1"],
        &control,
    );
    let [a, _] = &guests;
    // Frames cross both threads (the gateway's ping is the engine's; between guests, either).
    a.must(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "192.168.122.1"]);
    a.must(&[
        "ping",
        "-c",
        "20",
        "-i",
        "0.01",
        "-W",
        "2",
        "192.168.122.11",
    ]);
    // The control thread still gets answers from the real-time engine.
    assert!(stats_of(&control)["ports"].is_array());

    let threads = threads_of(sy.pid());
    let find = |name: &str| {
        threads
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no thread {name}: {threads:?}"))
    };
    const SCHED_OTHER: u32 = 0;
    const SCHED_RR: u32 = 2;
    let engine = find("switchyard");
    assert_eq!(
        (engine.cpus.as_str(), engine.policy, engine.priority),
        (engine_cpu.to_string().as_str(), SCHED_RR, 1),
        "{threads:?}"
    );
    let worker = find("sy-worker-1");
    assert_eq!(
        (worker.cpus.as_str(), worker.policy, worker.priority),
        (worker_cpu.to_string().as_str(), SCHED_RR, 1),
        "{threads:?}"
    );
    // The control thread (and the lease writer) are started before the engine places itself,
    // and the datapath's threads start others under SCHED_RESET_ON_FORK: ordinary threads.
    for other in threads
        .iter()
        .filter(|t| t.name != "switchyard" && !t.name.starts_with("sy-worker"))
    {
        assert_eq!(other.policy, SCHED_OTHER, "{threads:?}");
        if allowed.len() > 1 {
            assert_ne!(other.cpus, engine.cpus, "{threads:?}");
        }
    }
}

#[test]
fn a_cpu_switchyard_may_not_run_on_is_refused_before_anything_starts() {
    let allowed = switchyard_tests::allowed_cpus();
    let outside = (0..1024).find(|c| !allowed.contains(c)).unwrap();
    let out = std::process::Command::new(switchyard_tests::switchyard_bin())
        .args(["run", "--cpus", &outside.to_string(), "--tap", "sy-never0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("CPU {outside} is not one this process may run on")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("port 0"),
        "refused before any port was opened: {stderr}"
    );
}

/// `<sy:datapath>` in the network's XML does what the options do, without them: two threads,
/// the engine's on one CPU and the worker's on another, real-time.
#[test]
fn sy_datapath_in_the_network_places_its_threads() {
    require(&["ip", "ping"]);
    let allowed = switchyard_tests::allowed_cpus();
    let (engine_cpu, worker_cpu) = (allowed[0], *allowed.last().unwrap());
    let dir = TempDir::new("plxml");
    let xml = dir.write(
        "placed.xml",
        &format!(
            "<network xmlns:sy='urn:switchyard:network:1'>\n\
             <name>placed</name>\n\
             <ip address='192.168.122.1' netmask='255.255.255.0'/>\n\
             <sy:datapath workers='2' cpus='{engine_cpu},{worker_cpu}' realtime='2'/>\n\
             </network>\n"
        ),
    );
    let control = dir.file("sy.sock");
    let (guests, sy) = two_guests_run(&["run", &xml], &control);
    let [a, _] = &guests;
    let link = a.must(&["ip", "-d", "link", "show", "dev", "eth0"]);
    assert!(link.contains("multi_queue numqueues 2"), "{link}");
    a.must(&[
        "ping",
        "-c",
        "10",
        "-i",
        "0.01",
        "-W",
        "2",
        "192.168.122.11",
    ]);
    let threads = threads_of(sy.pid());
    let placed = |name: &str| {
        let t = (threads.iter().find(|t| t.name == name))
            .unwrap_or_else(|| panic!("no thread {name}: {threads:?}"));
        (t.cpus.clone(), t.policy, t.priority)
    };
    assert_eq!(placed("switchyard"), (engine_cpu.to_string(), 2, 2));
    assert_eq!(placed("sy-worker-1"), (worker_cpu.to_string(), 2, 2));
    assert_eq!(placed("sy-control").1, 0, "{threads:?}");
}
