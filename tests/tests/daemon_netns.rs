//! The control plane end to end: `switchyard daemon` in a namespace of its own, driven by the
//! virsh-style commands (`net-define`, `net-start`, `net-list`, ...), with its socket and
//! state directory in the test's temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use switchyard_tests::*;

/// A daemon process, stopped with SIGTERM on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// A daemon with its directory and namespace; field order is drop order, so the process
/// stops before its namespace goes.
struct Daemon {
    process: Process,
    dir: TempDir,
    ns: Netns,
}

impl Daemon {
    fn start(dir: TempDir, ns: Netns) -> Daemon {
        Daemon::start_with(dir, ns, &[])
    }

    /// [`Daemon::start`] with more options for `switchyard daemon`.
    fn start_with(dir: TempDir, ns: Netns, options: &[&str]) -> Daemon {
        let bin = switchyard_bin().display().to_string();
        let log = std::fs::File::create(dir.0.join("daemon.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, &bin, "daemon"])
            .args(["--socket", &dir.file("run/daemon.sock")])
            .args(["--state-dir", &dir.file("state")])
            .args(["--resolv-conf", "/dev/null"])
            .args(options)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = Daemon {
            process: Process(child),
            dir,
            ns,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !daemon.cli(&["net-list"]).status.success() {
            assert!(Instant::now() < deadline, "the daemon did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    /// Stops the daemon (SIGTERM) and hands back its directory and namespace.
    fn stop(self) -> (TempDir, Netns) {
        let Daemon { process, dir, ns } = self;
        drop(process);
        (dir, ns)
    }

    /// `switchyard ARGS` against this daemon.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(switchyard_bin())
            .args(args)
            .env("SWITCHYARD_SOCKET", self.dir.file("run/daemon.sock"))
            .output()
            .unwrap()
    }

    /// `switchyard ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "switchyard {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `switchyard ARGS`, which must fail with one line naming `needle`.
    fn fails(&self, args: &[&str], needle: &str) {
        let out = self.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "switchyard {} succeeded",
            args.join(" ")
        );
        assert!(err.contains(needle), "switchyard {}: {err}", args.join(" "));
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

const LAB: &str = "<network>
  <name>lab</name>
  <bridge name='br-lab'/>
  <!-- a comment survives -->
  <ip address='10.77.0.1' prefix='24'>
    <dhcp><range start='10.77.0.10' end='10.77.0.20'/></dhcp>
  </ip>
</network>
";

/// A udhcpc event script in the daemon's directory that sets the leased address.
fn lease_script(daemon: &Daemon) -> String {
    let script = daemon.dir.file("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in\n  bound) ip addr add \"$ip/$mask\" dev \"$interface\" ;;\nesac\n",
    )
    .unwrap();
    must(&["chmod", "+x", &script]);
    script
}

/// `attach-interface` of a tap `eth0` in namespace `netns`, live, with MAC `mac`.
fn attach_tap<'a>(network: &'a str, netns: &'a str, mac: &'a str) -> Vec<&'a str> {
    vec![
        "attach-interface",
        "--network",
        network,
        "--type",
        "tap",
        "--target",
        "eth0",
        "--netns",
        netns,
        "--mac",
        mac,
    ]
}

fn define(daemon: &Daemon, name: &str, xml: &str) -> String {
    let file = daemon.dir.file(&format!("{name}.xml"));
    std::fs::write(&file, xml).unwrap();
    file
}

// define / start / list / info / dumpxml / destroy / undefine, as virsh shows them, and
// autostart across a restart of the daemon.
#[test]
fn define_start_list_dumpxml_and_autostart_across_a_restart() {
    let daemon = Daemon::start(TempDir::new("sydmn"), Netns::new("d"));
    let file = define(&daemon, "lab", LAB);
    assert_eq!(
        daemon.ok(&["net-define", &file]).trim(),
        format!("Network lab defined from {file}")
    );
    let list = daemon.ok(&["net-list", "--all"]);
    assert!(
        list.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["lab", "inactive", "no", "yes"]),
        "{list}"
    );
    assert!(
        !daemon.ok(&["net-list"]).contains("lab"),
        "inactive is not listed"
    );
    daemon.ok(&["net-start", "lab"]);
    let list = daemon.ok(&["net-list"]);
    assert!(list.starts_with(" Name"), "{list}");
    assert!(list.contains("active"), "{list}");

    // dumpxml: what was defined, byte for byte, plus the generated uuid and MAC.
    let xml = daemon.ok(&["net-dumpxml", "lab"]);
    assert!(xml.contains("<!-- a comment survives -->"), "{xml}");
    assert!(
        xml.contains("<uuid>") && xml.contains("<mac address='52:54:00:"),
        "{xml}"
    );
    let stripped: String = xml
        .lines()
        .filter(|l| !l.contains("<uuid>") && !l.contains("<mac address"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(stripped, LAB);
    let info = daemon.ok(&["net-info", "lab"]);
    let uuid = xml
        .split("<uuid>")
        .nth(1)
        .unwrap()
        .split("</uuid>")
        .next()
        .unwrap();
    assert!(info.contains(&format!("UUID:           {uuid}")), "{info}");
    assert!(info.contains("Active:         yes") && info.contains("Bridge:         br-lab"));
    let json: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["net-info", "lab", "--json"])).unwrap();
    assert_eq!(json["data"]["active"], true);
    let started: serde_json::Value =
        serde_json::from_str(&daemon.ok(&["net-autostart", "lab", "--disable", "--json"])).unwrap();
    assert_eq!(started["ok"], true);

    // The running network answers on its own socket, found through SWITCHYARD_SOCKET.
    let stats = daemon.ok(&["stats", "lab"]);
    assert!(stats.contains("\"ports\""), "{stats}");

    daemon.ok(&["net-autostart", "lab"]);
    let (dir, ns) = daemon.stop();
    let daemon = Daemon::start(dir, ns);
    let list = daemon.ok(&["net-list"]);
    assert!(
        list.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["lab", "active", "yes", "yes"]),
        "autostarted after the restart: {list}"
    );
    // Same uuid after the restart: it was stored.
    assert!(daemon.ok(&["net-dumpxml", "lab"]).contains(uuid));
    daemon.ok(&["net-autostart", "lab", "--disable"]);
    daemon.ok(&["net-destroy", "lab"]);
    daemon.ok(&["net-undefine", "lab"]);
    assert!(!daemon.ok(&["net-list", "--all"]).contains("lab"));
}

// Every error is one clear line and a non-zero exit; bad definitions write nothing.
#[test]
fn errors_are_one_line_and_bad_definitions_write_nothing() {
    let daemon = Daemon::start(TempDir::new("sydme"), Netns::new("d"));
    daemon.fails(&["net-start", "nope"], "network 'nope' is not defined");
    daemon.fails(&["net-destroy", "nope"], "network 'nope' is not active");
    daemon.fails(&["net-info", "nope"], "not defined");
    daemon.fails(&["net-dumpxml", "nope"], "not defined");
    daemon.fails(&["net-undefine", "nope"], "not defined");
    daemon.fails(&["net-autostart", "nope"], "not defined");
    let file = define(&daemon, "lab", LAB);
    daemon.ok(&["net-define", &file]);
    daemon.ok(&["net-start", "lab"]);
    daemon.fails(&["net-start", "lab"], "already active");
    daemon.ok(&["net-destroy", "lab"]);

    for (name, xml, needle) in [
        ("nwf", "<network><name>bad</name", "well-formed"),
        (
            "unknown",
            "<network>\n<name>bad</name>\n<portgroup name='x'/>\n</network>",
            "line 3: unsupported element <portgroup>",
        ),
        (
            "address",
            "<network><name>bad</name><ip address='10.0.0.300'/></network>",
            "10.0.0.300",
        ),
        (
            "range",
            "<network><name>bad</name><ip address='10.0.0.1' prefix='24'><dhcp>\
             <range start='10.0.1.2' end='10.0.1.9'/></dhcp></ip></network>",
            "<dhcp>",
        ),
        (
            "overlap",
            "<network><name>bad</name><ip address='10.0.0.1' prefix='24'><dhcp>\n\
             <range start='10.0.0.10' end='10.0.0.50'/>\n\
             <range start='10.0.0.40' end='10.0.0.90'/>\n</dhcp></ip></network>",
            "line 3",
        ),
    ] {
        let file = define(&daemon, name, xml);
        daemon.fails(&["net-define", &file], needle);
    }
    let stored: Vec<String> = std::fs::read_dir(daemon.dir.0.join("state/networks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(stored, ["lab.xml"], "nothing but the good definition");

    // No daemon: the error says so and how to start one.
    let out = Command::new(switchyard_bin())
        .args(["net-list"])
        .env("SWITCHYARD_SOCKET", daemon.dir.file("nothing-here.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `switchyard daemon` running?"));
}

// attach-interface as virsh: live (--current) a tap inside a guest namespace, which then gets
// a lease and pings the gateway, shown by iface-list and fdb; detach removes the tap; a
// --config attach appears only after net-destroy + net-start, and --persistent detach
// removes it from both.
#[test]
fn attach_and_detach_interfaces_live_and_in_the_configuration() {
    require(&["busybox", "ping"]);
    let daemon = Daemon::start(TempDir::new("sydma"), Netns::new("d"));
    let (g1, g2) = (Netns::new("g"), Netns::new("g"));
    let file = define(&daemon, "lab", LAB);
    daemon.ok(&["net-define", &file]);
    daemon.ok(&["net-start", "lab"]);
    let mut args = attach_tap("lab", &g1.name, "52:54:00:aa:00:01");
    args.extend(["--model", "virtio"]);
    let attached = daemon.ok(&args);
    assert_eq!(attached.trim(), "Interface attached successfully");
    let script = lease_script(&daemon);
    g1.must(&["ip", "link", "set", "eth0", "up"]);
    g1.udhcpc("eth0", &script, &[]);
    g1.must(&["ping", "-c", "1", "-W", "2", "10.77.0.1"]);
    let ifaces = daemon.ok(&["iface-list", "lab"]);
    let row: Vec<&str> = ifaces
        .lines()
        .find(|l| l.contains("eth0"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        row,
        [
            "eth0",
            "tap",
            g1.name.as_str(),
            "virtio",
            "52:54:00:aa:00:01",
            "10.77.0.10/24"
        ],
        "{ifaces}"
    );
    assert!(daemon.ok(&["fdb", "lab"]).contains("52:54:00:aa:00:01"));
    daemon.fails(
        &[
            "attach-interface",
            "--network",
            "lab",
            "--target",
            "eth0",
            "--netns",
            &g1.name,
        ],
        "already attached",
    );

    daemon.ok(&[
        "detach-interface",
        "--network",
        "lab",
        "--mac",
        "52:54:00:aa:00:01",
    ]);
    assert!(!g1.has_link("eth0"), "the tap switchyard created is gone");
    daemon.fails(
        &["detach-interface", "--network", "lab", "--target", "eth0"],
        "no interface eth0",
    );

    // --config: not now, at the next start.
    daemon.ok(&[
        "attach-interface",
        "--network",
        "lab",
        "--target",
        "eth1",
        "--netns",
        &g2.name,
        "--config",
    ]);
    assert!(!g2.has_link("eth1"));
    assert!(!daemon.ok(&["net-dumpxml", "lab"]).contains("sy:port"));
    assert!(
        daemon
            .ok(&["net-dumpxml", "lab", "--inactive"])
            .contains("<sy:port type='tap' target='eth1'")
    );
    daemon.ok(&["net-destroy", "lab"]);
    daemon.ok(&["net-start", "lab"]);
    assert!(g2.has_link("eth1"));
    assert!(daemon.ok(&["iface-list", "lab"]).contains("eth1"));
    daemon.ok(&[
        "detach-interface",
        "--network",
        "lab",
        "--target",
        "eth1",
        "--persistent",
    ]);
    assert!(!g2.has_link("eth1"));
    assert!(
        !daemon
            .ok(&["net-dumpxml", "lab", "--inactive"])
            .contains("sy:port")
    );
    daemon.fails(
        &["attach-interface", "--network", "nope", "--target", "x"],
        "not active",
    );

    // A VM port: the socket QEMU connects to exists while the port does.
    let socket = daemon.dir.file("vm1.sock");
    daemon.ok(&[
        "attach-interface",
        "--network",
        "lab",
        "--type",
        "stream",
        "--socket",
        &socket,
    ]);
    assert!(std::path::Path::new(&socket).exists());
    let ifaces = daemon.ok(&["iface-list", "lab"]);
    assert!(
        ifaces
            .lines()
            .any(|l| l.contains("stream") && l.contains(&socket)),
        "{ifaces}"
    );
    daemon.ok(&["detach-interface", "--network", "lab", "--target", &socket]);
    assert!(!std::path::Path::new(&socket).exists());
}

// `daemon --workers 2`: every network's taps get two queues, attached live ones too, and
// the guests behind them lease, reach the gateway and each other.
#[test]
fn a_daemon_with_two_workers_gives_attached_taps_two_queues() {
    require(&["busybox", "ping"]);
    let daemon = Daemon::start_with(TempDir::new("sydw"), Netns::new("d"), &["--workers", "2"]);
    let guests = [Netns::new("g"), Netns::new("g")];
    let file = define(&daemon, "lab", LAB);
    daemon.ok(&["net-define", &file]);
    daemon.ok(&["net-start", "lab"]);
    let script = lease_script(&daemon);
    for (i, g) in guests.iter().enumerate() {
        let mac = format!("52:54:00:aa:01:0{i}");
        let attached = daemon.ok(&attach_tap("lab", &g.name, &mac));
        assert_eq!(attached.trim(), "Interface attached successfully");
        let link = g.must(&["ip", "-d", "link", "show", "dev", "eth0"]);
        assert!(link.contains("multi_queue numqueues 2"), "{link}");
        g.must(&["ip", "link", "set", "eth0", "up"]);
        g.udhcpc("eth0", &script, &[]);
        g.must(&["ping", "-c", "1", "-W", "2", "10.77.0.1"]);
    }
    let address = guests[1].must(&["ip", "-4", "-br", "addr", "show", "dev", "eth0"]);
    let ip = address
        .split_whitespace()
        .find_map(|w| w.strip_suffix("/24"))
        .expect("a leased address")
        .to_string();
    guests[0].must(&["ping", "-c", "3", "-i", "0.2", "-W", "2", &ip]);
    let stats = daemon.ok(&["stats", "lab"]);
    assert!(stats.contains("\"worker_forwarded\""), "{stats}");
}
