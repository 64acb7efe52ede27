//! `switchyard demo`: the main job, shown end to end on a machine with nothing set up.
//!
//! It builds three guests as network namespaces, plugs each into the embedded default
//! network through a tap created inside the namespace, and runs the commands a libvirt user
//! would (`udhcpc` for an address from the gateway's DHCP, `ip addr`, `ping`, `iperf3`),
//! printing each command and its real output. Then it shows the DHCP leases and what the
//! switch learned and counted, and removes everything it made.

use crate::network::NetworkDef;
use crate::report;
use crate::run::{self, RunOptions};
use datapath::MacAddr;
use datapath::io::TapSpec;
use datapath::switch::{DEFAULT_AGING, DEFAULT_CAPACITY};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Namespaces made by the demo, deleted when dropped (also on error or Ctrl-C).
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn sh(args: &[&str]) -> Result<String, String> {
    sh_both(args).map(|(stdout, _)| stdout)
}

/// Runs `args`; on success returns (stdout, stderr).
fn sh_both(args: &[&str]) -> Result<(String, String), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| {
            format!(
                "{}: {e} (is it installed? the README's command installs it)",
                args[0]
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Prints a guest's command as a user would type it, runs it, and prints its output.
fn show(guest: &str, ns: &str, cmd: &[&str]) -> Result<String, String> {
    println!("\n[{guest}]$ {}", cmd.join(" "));
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(cmd);
    let (out, err) = sh_both(&full)?;
    // Some tools (udhcpc) report on stderr: show it as a terminal would.
    print!("{out}{err}");
    Ok(out)
}

/// What udhcpc runs on each event: configure the guest's eth0 (address and default route)
/// inside its namespace, nothing else (the host's resolv.conf is left alone).
const UDHCPC_SCRIPT: &str = "#!/bin/sh
case \"$1\" in
  bound|renew) ip -4 addr flush dev \"$interface\"; ip addr add \"$ip/$mask\" dev \"$interface\"
    ip route replace default via \"$router\" ;;
  deconfig) ip -4 addr flush dev \"$interface\"; ip link set \"$interface\" up ;;
esac
";

/// The embedded default network, with its NAT given an uplink: `up0` in the engine's
/// namespace, a veth to the demo's `outside` host, and the external address 203.0.113.2
/// there (libvirt's `<forward mode='nat'>` with `dev=` and `<nat><address>`).
fn demo_network() -> String {
    crate::network::DEFAULT_XML
        .replacen(
            "<network>",
            "<network xmlns:sy='urn:switchyard:network:1'>",
            1,
        )
        .replacen(
            "<forward/>",
            "<forward mode='nat' dev='up0'>\n    <nat><address start='203.0.113.2' \
             end='203.0.113.2'/><port start='1024' end='65535'/></nat>\n  </forward>\n  \
             <sy:uplink prefix='24' gateway='203.0.113.1'/>",
            1,
        )
}

pub fn demo(keep: bool) -> Result<(), String> {
    if !nix_is_root() {
        return Err("the demo creates network namespaces: run it as root (sudo)".into());
    }
    let xml = demo_network();
    let def = NetworkDef::parse(&xml).map_err(|e| e.to_string())?;
    let tag = std::process::id();
    let guests = ["vm1", "vm2"];
    let ns = |n: &str| format!("sy-demo-{tag}-{n}");
    let namespaces = Namespaces(vec![ns("vm1"), ns("vm2"), ns("sw"), ns("outside")]);
    let (sw, outside) = (&namespaces.0[2], &namespaces.0[3]);
    println!("== switchyard demo: libvirt's default network, two guests and an outside host ==");
    println!(
        "Guests are network namespaces with a tap 'eth0' created inside each by switchyard;\n\
         switchyard runs in '{sw}', NATing 192.168.122.0/24 to 203.0.113.2 on its uplink up0,\n\
         a veth to '{outside}' (203.0.113.1), which serves HTTP. No kernel bridge, no\n\
         iptables, no dnsmasq."
    );
    for n in &namespaces.0 {
        sh(&["ip", "netns", "add", n])?;
        sh(&["ip", "-n", n, "link", "set", "lo", "up"])?;
    }
    sh(&[
        "ip", "-n", sw, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns",
        outside,
    ])?;
    sh(&["ip", "-n", sw, "link", "set", "up0", "up"])?;
    sh(&[
        "ip",
        "-n",
        outside,
        "addr",
        "add",
        "203.0.113.1/24",
        "dev",
        "eth0",
    ])?;
    sh(&["ip", "-n", outside, "link", "set", "eth0", "up"])?;
    let macs: Vec<MacAddr> = (1..=2u8)
        .map(|i| MacAddr([0x52, 0x54, 0, 0xde, 0, i]))
        .collect();
    let taps: Vec<TapSpec> = guests
        .iter()
        .zip(&macs)
        .map(|(g, mac)| TapSpec {
            name: "eth0".into(),
            netns: Some(datapath::io::netns::netns_path(&ns(g))),
            mac: Some(*mac),
            mtu: None,
            clean_traffic: None,
        })
        .collect();
    let state_dir = std::env::temp_dir().join(format!("switchyard-demo-{tag}"));
    let opts = RunOptions {
        xml: None,
        taps,
        streams: Vec::new(),
        fdb_aging: DEFAULT_AGING,
        fdb_max: DEFAULT_CAPACITY,
        json: false,
        control: Some(state_dir.join("ctl.sock")),
        // No upstream DNS: the demo only asks for its own guests' names.
        resolv_conf: "/dev/null".into(),
        metrics: None,
        seccomp: datapath::io::seccomp::SeccompMode::Enforce,
        busy_poll: std::time::Duration::ZERO,
        workers: 1,
        placement: Default::default(),
        // The demo's leases are thrown away with it.
        state_dir: Some(state_dir.clone()),
    };
    println!(
        "\n$ switchyard run default+uplink.xml --tap eth0@{}=52:54:00:de:00:01 --tap eth0@{}=...",
        ns("vm1"),
        ns("vm2")
    );
    // The engine's thread lives in the switch's namespace (its uplink socket and DNS
    // sockets are made there); the taps are made inside the guests' namespaces.
    let sw_path = datapath::io::netns::netns_path(sw);
    let (tx, rx) = std::sync::mpsc::channel();
    let thread_def = def.clone();
    let engine_thread = std::thread::spawn(move || {
        let built = std::fs::File::open(&sw_path)
            .map_err(|e| format!("{}: {e}", sw_path.display()))
            .and_then(|f| {
                datapath::io::sys::setns_net(std::os::fd::AsFd::as_fd(&f))
                    .map_err(|e| e.to_string())
            })
            .and_then(|()| run::start(&thread_def, &opts))
            .and_then(|dp| run::confine(opts.seccomp).map(|()| dp));
        match built {
            Ok(mut dp) => {
                let _ = tx.send(Ok(dp.handle()));
                let result = dp.run(|_| {}, run::answer);
                Some((dp, result))
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                None
            }
        }
    });
    let handle = rx
        .recv()
        .map_err(|_| "the engine thread ended".to_string())??;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(signal, stop.clone());
    }

    let script = state_dir.join("udhcpc.sh");
    std::fs::write(&script, UDHCPC_SCRIPT).map_err(|e| format!("{}: {e}", script.display()))?;
    sh(&["chmod", "+x", &script.display().to_string()])?;
    let script = script.display().to_string();
    let www = state_dir.join("www");
    std::fs::create_dir_all(&www).map_err(|e| e.to_string())?;
    std::fs::write(www.join("hello.txt"), "hello from the outside\n").map_err(|e| e.to_string())?;
    let bin = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = bin.display().to_string();
    let control = state_dir.join("ctl.sock").display().to_string();
    let mut background: Vec<std::process::Child> = Vec::new();
    let steps = |background: &mut Vec<std::process::Child>| -> Result<(), String> {
        println!("\n-- 1. Each guest asks for an address: DHCP from the gateway 192.168.122.1 --");
        let mut addrs = Vec::new();
        for g in &guests {
            let hostname = format!("hostname:{g}");
            show(
                g,
                &ns(g),
                &[
                    "busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-i", "eth0",
                    "-s", &script, "-x", &hostname,
                ],
            )?;
            let out = sh(&[
                "ip",
                "-n",
                &ns(g),
                "-4",
                "-o",
                "addr",
                "show",
                "dev",
                "eth0",
            ])?;
            let addr = out
                .split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .and_then(|cidr| cidr.split('/').next())
                .ok_or_else(|| format!("{g}: udhcpc configured no address"))?
                .to_string();
            addrs.push(addr);
        }
        println!("\n-- 2. vm1 finds vm2 by name: the gateway's DNS knows every lease --");
        show(
            "vm1",
            &ns("vm1"),
            &["busybox", "nslookup", "vm2", "192.168.122.1"],
        )?;
        show(
            "vm1",
            &ns("vm1"),
            &["ping", "-c", "2", "-i", "0.2", &addrs[1]],
        )?;
        if stop.load(Ordering::SeqCst) {
            return Err("interrupted".into());
        }
        println!("\n-- 3. vm1 fetches a page from the outside, through NAT --");
        background.push(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    outside,
                    "python3",
                    "-m",
                    "http.server",
                    "8080",
                ])
                .args(["--bind", "203.0.113.1", "--directory"])
                .arg(&www)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("python3: {e}"))?,
        );
        let seen = state_dir.join("outside.txt");
        background.push(
            Command::new("ip")
                .args([
                    "netns", "exec", outside, "tcpdump", "-i", "eth0", "-n", "-l",
                ])
                .args(["-c", "4", "tcp port 8080"])
                .stdout(std::fs::File::create(&seen).map_err(|e| e.to_string())?)
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("tcpdump: {e}"))?,
        );
        wait_listening(outside, 8080)?;
        std::thread::sleep(Duration::from_millis(300));
        show(
            "vm1",
            &ns("vm1"),
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "http://203.0.113.1:8080/hello.txt",
            ],
        )?;
        println!("\n$ switchyard conntrack   # the NAT entry the fetch created");
        print!("{}", sh(&[&bin, "conntrack", "--socket", &control])?);
        std::thread::sleep(Duration::from_millis(300));
        println!("\n[outside]$ tcpdump -n -i eth0 tcp port 8080   # what the outside saw");
        let seen = std::fs::read_to_string(&seen).unwrap_or_default();
        for line in seen.lines().take(4) {
            println!("{line}");
        }
        println!("(the guest's 192.168.122.x never leaves: the outside sees 203.0.113.2)");
        if sh(&["iperf3", "--version"]).is_ok() {
            println!("\n-- 4. Throughput between the guests, through the userspace switch --");
            background.push(
                Command::new("ip")
                    .args(["netns", "exec", &ns("vm2"), "iperf3", "-s", "-1"])
                    .stdout(Stdio::null())
                    .spawn()
                    .map_err(|e| e.to_string())?,
            );
            std::thread::sleep(Duration::from_millis(300));
            show(
                "vm1",
                &ns("vm1"),
                &["iperf3", "-c", &addrs[1], "-t", "2", "-f", "g"],
            )?;
        }
        Ok(())
    };
    let outcome = steps(&mut background);
    if keep && outcome.is_ok() {
        println!("\nLeft running. Try, for example:");
        println!(
            "  ip netns exec {} curl http://203.0.113.1:8080/hello.txt",
            ns("vm1")
        );
        println!("  switchyard trace default --socket {control}");
        println!("Ctrl-C stops the switch and removes the namespaces.");
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for mut child in background {
        let _ = child.kill();
        let _ = child.wait();
    }
    handle.shutdown();
    let ended = engine_thread
        .join()
        .map_err(|_| "engine thread panicked".to_string())?;
    if let Some((dp, result)) = ended {
        result.map_err(|e| e.to_string())?;
        let engine = dp.engine();
        if let Some(dhcp) = engine.dhcp() {
            println!("\n== DHCP leases (switchyard net-dhcp-leases default) ==");
            print!(
                "{}",
                dhcp_dns::dhcp::format_lease_table(dhcp.leases(), dhcp.config().prefix)
            );
        }
        println!("\n== What the switch learned (switchyard fdb) ==");
        print!(
            "{}",
            report::fdb_table(&engine.fdb_rows(Instant::now()), |id| {
                engine
                    .port(datapath::PortId(id))
                    .map(|p| p.name.clone())
                    .unwrap_or_default()
            })
        );
        println!("\n== Counters (switchyard stats) ==");
        print!("{}", report::stats_table(&engine.stats()));
        drop(dp);
    }
    drop(namespaces);
    let _ = std::fs::remove_dir_all(&state_dir);
    println!("\nRemoved the namespaces and taps; nothing is left behind.");
    outcome
}

/// Waits (bounded) until something listens on TCP `port` in namespace `ns`.
fn wait_listening(ns: &str, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "ss",
            "-Hltn",
            &format!("sport = :{port}"),
        ])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("nothing listens on port {port} in {ns}"))
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
