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

fn wait_for_ipv6_link_local(ns: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = sh(&["ip", "-n", ns, "-6", "addr", "show", "dev", "eth0"])?;
        if out.contains("fe80") && !out.contains("tentative") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "{ns}: IPv6 link-local address never left duplicate address detection"
    ))
}

/// The EUI-64 link-local address (RFC 4291 2.5.1, appendix A) the kernel derives from `mac`.
fn link_local(mac: MacAddr) -> String {
    let m = mac.0;
    format!(
        "fe80::{:x}:{:x}:{:x}:{:x}",
        u16::from_be_bytes([m[0] ^ 0x02, m[1]]),
        u16::from_be_bytes([m[2], 0xff]),
        u16::from_be_bytes([0xfe, m[3]]),
        u16::from_be_bytes([m[4], m[5]])
    )
}

pub fn demo(keep: bool) -> Result<(), String> {
    if !nix_is_root() {
        return Err("the demo creates network namespaces: run it as root (sudo)".into());
    }
    let def = NetworkDef::parse(crate::network::DEFAULT_XML).map_err(|e| e.to_string())?;
    let tag = std::process::id();
    let guests = ["vm1", "vm2", "vm3"];
    let namespaces = Namespaces(
        guests
            .iter()
            .map(|g| format!("sy-demo-{tag}-{g}"))
            .collect(),
    );
    println!("== switchyard demo: libvirt's default network, three guests, no kernel bridge ==");
    println!(
        "Guests are network namespaces; each gets a tap 'eth0' created inside it by switchyard."
    );
    for ns in &namespaces.0 {
        sh(&["ip", "netns", "add", ns])?;
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    }
    let macs: Vec<MacAddr> = (1..=3u8)
        .map(|i| MacAddr([0x52, 0x54, 0, 0xde, 0, i]))
        .collect();
    let taps: Vec<TapSpec> = namespaces
        .0
        .iter()
        .zip(&macs)
        .map(|(ns, mac)| TapSpec {
            name: "eth0".into(),
            netns: Some(datapath::io::netns::netns_path(ns)),
            mac: Some(*mac),
            mtu: None,
        })
        .collect();
    let opts = RunOptions {
        xml: None,
        taps,
        streams: Vec::new(),
        fdb_aging: DEFAULT_AGING,
        fdb_max: DEFAULT_CAPACITY,
        json: false,
        control: None,
        // The demo's leases are thrown away with it.
        resolv_conf: "/etc/resolv.conf".into(),
        metrics: None,
        state_dir: Some(
            std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id())),
        ),
    };
    println!(
        "\n$ switchyard run --tap eth0@{}=... --tap ... --tap ...",
        namespaces.0[0]
    );
    for line in def.not_yet_implemented() {
        println!("  (note: {line})");
    }
    let mut dp = run::build(&def, &opts)?;
    dp.install_signal_handlers().map_err(|e| e.to_string())?;
    let handle = dp.handle();
    let engine_thread = std::thread::spawn(move || {
        let result = dp.run(|_| {}, run::answer);
        (dp, result)
    });

    let state_dir = opts.state_dir.clone().unwrap_or_default();
    let script = state_dir.join("udhcpc.sh");
    std::fs::write(&script, UDHCPC_SCRIPT).map_err(|e| format!("{}: {e}", script.display()))?;
    sh(&["chmod", "+x", &script.display().to_string()])?;
    let script = script.display().to_string();
    let steps = || -> Result<(), String> {
        let mut addrs = Vec::new();
        for (i, ns) in namespaces.0.iter().enumerate() {
            let hostname = format!("hostname:{}", guests[i]);
            show(
                guests[i],
                ns,
                &[
                    "busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-i", "eth0",
                    "-s", &script, "-x", &hostname,
                ],
            )?;
            let out = sh(&["ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"])?;
            let addr = out
                .split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .and_then(|cidr| cidr.split('/').next())
                .ok_or_else(|| format!("{}: udhcpc configured no address", guests[i]))?
                .to_string();
            addrs.push(addr);
        }
        show(
            guests[0],
            &namespaces.0[0],
            &["ip", "-br", "addr", "show", "dev", "eth0"],
        )?;
        show(
            guests[0],
            &namespaces.0[0],
            &["ping", "-c", "2", "-i", "0.2", "192.168.122.1"],
        )?;
        show(
            guests[0],
            &namespaces.0[0],
            &["ip", "neigh", "show", "192.168.122.1"],
        )?;
        for (from, to) in [(0usize, 1usize), (0, 2), (1, 2)] {
            let dst = &addrs[to];
            show(
                guests[from],
                &namespaces.0[from],
                &["ping", "-c", "2", "-i", "0.2", dst],
            )?;
            if handle.is_shutdown() {
                return Err("interrupted".into());
            }
        }
        wait_for_ipv6_link_local(&namespaces.0[0])?;
        wait_for_ipv6_link_local(&namespaces.0[1])?;
        let ll = format!("{}%eth0", link_local(macs[1]));
        show(
            guests[0],
            &namespaces.0[0],
            &["ping", "-6", "-c", "2", "-i", "0.2", &ll],
        )?;
        if sh(&["iperf3", "--version"]).is_ok() {
            let server = Command::new("ip")
                .args(["netns", "exec", &namespaces.0[1], "iperf3", "-s", "-1"])
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_millis(300));
            let result = show(
                guests[0],
                &namespaces.0[0],
                &["iperf3", "-c", &addrs[1], "-t", "3", "-f", "g"],
            );
            let mut server = server;
            let _ = server.kill();
            let _ = server.wait();
            result?;
        }
        Ok(())
    };
    let outcome = steps();
    if keep && outcome.is_ok() {
        println!("\nLeft running. Try, for example:");
        println!("  ip netns exec {} ping 192.168.122.1", namespaces.0[0]);
        println!("Ctrl-C stops the switch and removes the namespaces.");
    } else {
        handle.shutdown();
    }
    let (dp, result) = engine_thread
        .join()
        .map_err(|_| "engine thread panicked".to_string())?;
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
    drop(namespaces);
    if let Some(dir) = &opts.state_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    println!("\nRemoved the namespaces and taps; nothing is left behind.");
    outcome
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

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 4291 appendix A: invert the U/L bit and insert ff:fe in the middle.
    #[test]
    fn eui64_link_local() {
        assert_eq!(
            link_local(MacAddr([0x52, 0x54, 0, 0xde, 0, 2])),
            "fe80::5054:ff:fede:2"
        );
    }
}
