//! Helpers for switchyard's integration tests: uniquely named network namespaces and taps
//! that are removed on drop, a running `switchyard` process, and the real tools people use.
//!
//! Every test that touches the kernel needs root and the tools `tests/run.sh` installs. A
//! missing tool or privilege fails the test with a message saying so: nothing skips silently.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name no other test (in this or another process) uses: `{prefix}{pid}x{n}`, at most 15
/// characters so it is a valid interface name too.
pub fn unique_name(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let name = format!("{prefix}{}x{n}", std::process::id() % 100_000);
    assert!(name.len() <= 15, "name {name} too long for an interface");
    name
}

/// Fails the test unless it runs as root with `tools` on the PATH.
pub fn require(tools: &[&str]) {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        })
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "this test needs root (network namespaces and taps): run `sudo tests/run.sh`"
    );
    for tool in tools {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "this test needs `{tool}`: `tests/run.sh` installs it"
        );
    }
}

/// Runs a command and returns its output; panics if it cannot start.
pub fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args.join(" ")))
}

/// Runs a command that must succeed; returns its stdout.
pub fn must(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "`{}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace made for one test, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique_name(&format!("sy{tag}"));
        must(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.must(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn argv<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["ip", "netns", "exec", self.name.as_str()];
        v.extend_from_slice(args);
        v
    }

    /// Runs `args` inside the namespace.
    pub fn run(&self, args: &[&str]) -> Output {
        run(&self.argv(args))
    }

    /// Runs `args` inside the namespace; it must succeed.
    pub fn must(&self, args: &[&str]) -> String {
        must(&self.argv(args))
    }

    /// Starts a background process inside the namespace (killed by the returned guard).
    pub fn spawn(&self, args: &[&str]) -> Background {
        let argv = self.argv(args);
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", argv.join(" ")));
        Background(child)
    }

    /// `--tap` argument for a tap named `dev` inside this namespace.
    pub fn tap_arg(&self, dev: &str, mac: &str) -> String {
        format!("{dev}@{}={mac}", self.name)
    }

    /// The kernel's counters of `dev` in this namespace: (rx_packets, rx_bytes).
    pub fn rx_counters(&self, dev: &str) -> (u64, u64) {
        let read = |f: &str| -> u64 {
            self.must(&["cat", &format!("/sys/class/net/{dev}/statistics/{f}")])
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{dev} {f}: {e}"))
        };
        (read("rx_packets"), read("rx_bytes"))
    }

    /// Waits until `dev`'s IPv6 link-local address has finished duplicate address detection.
    pub fn wait_link_local(&self, dev: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.must(&[
                "ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link",
            ]);
            if !out.is_empty() && !out.contains("tentative") {
                let addr = out
                    .split_whitespace()
                    .skip_while(|w| *w != "inet6")
                    .nth(1)
                    .expect("inet6 address");
                return addr.split('/').next().unwrap_or_default().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{}: {dev} link-local never usable: {out}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Gives `dev` the static address `cidr` (as the seeds' ifcfg files do, no DHCP) and, if
    /// asked, a default route via `gateway`.
    pub fn set_static_address(&self, dev: &str, cidr: &str, gateway: Option<&str>) {
        self.must(&["ip", "link", "set", dev, "up"]);
        self.must(&["ip", "addr", "add", cidr, "dev", dev]);
        if let Some(gw) = gateway {
            self.must(&["ip", "route", "add", "default", "via", gw]);
        }
    }

    /// A veth pair: `dev` here, `peer_dev` in namespace `peer`.
    pub fn veth_to(&self, dev: &str, peer: &Netns, peer_dev: &str) {
        self.must(&[
            "ip", "link", "add", dev, "type", "veth", "peer", "name", peer_dev, "netns", &peer.name,
        ]);
    }

    /// Runs busybox `udhcpc` once on `dev` with the event script `script` (bounded: 5
    /// discovers a second apart, 30 s in all); it must get a lease. `extra` are more
    /// arguments (`-x hostname:NAME`, ...).
    pub fn udhcpc(&self, dev: &str, script: &str, extra: &[&str]) -> String {
        let mut argv = vec![
            "timeout", "30", "busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-i",
            dev, "-s", script,
        ];
        argv.extend_from_slice(extra);
        self.must(&argv)
    }

    /// Starts busybox `udhcpc` in the background on `dev`, kept running (SIGUSR1 renews,
    /// SIGUSR2 releases), its pid in `pidfile`, asking for host name `hostname`.
    pub fn spawn_udhcpc(
        &self,
        dev: &str,
        script: &str,
        pidfile: &str,
        hostname: &str,
    ) -> Background {
        let hostname = format!("hostname:{hostname}");
        self.spawn(&[
            "busybox", "udhcpc", "-f", "-t", "5", "-T", "1", "-i", dev, "-s", script, "-p",
            pidfile, "-x", &hostname,
        ])
    }

    /// Waits (10 s at most) until something listens on TCP or UDP `port` here: a server
    /// started in the background is ready, with no probe connection (which a one-off server,
    /// `iperf3 -s -1`, would take as its one client).
    pub fn wait_listening(&self, port: u16) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let needle = format!(":{port} ");
        while !self.must(&["ss", "-lntu"]).contains(&needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing listens on {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Whether a link named `dev` exists in this namespace.
    pub fn has_link(&self, dev: &str) -> bool {
        self.run(&["ip", "link", "show", "dev", dev])
            .status
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Whatever still runs inside goes with it (a child whose `timeout` was killed, say, or
        // a client whose link was deleted under it): nothing a test started outlives it.
        let quietly = |args: &[&str]| Command::new(args[0]).args(&args[1..]).output().ok();
        if let Some(pids) = quietly(&["ip", "netns", "pids", &self.name]) {
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                quietly(&["kill", "-9", pid]);
            }
        }
        quietly(&["ip", "netns", "del", &self.name]);
    }
}

/// `--tap` arguments giving each of `guests` an `eth0` with the MAC beside it.
pub fn tap_args(guests: &[Netns], macs: &[&str]) -> Vec<String> {
    guests
        .iter()
        .zip(macs)
        .map(|(ns, mac)| ns.tap_arg("eth0", mac))
        .collect()
}

/// A busybox `udhcpc` event script for a directory's tests: on `bound` it sets the address
/// and default route and writes "IP SERVER" to `SCRIPT.lease`.
pub fn udhcpc_script(dir: &TempDir) -> String {
    let script = dir.write(
        "udhcpc.sh",
        "#!/bin/sh\ncase \"$1\" in\n  bound) ip addr add \"$ip/$mask\" dev \"$interface\"\n\
         [ -n \"$router\" ] && ip route add default via \"$router\"\n\
         echo \"$ip $serverid\" > \"$0.lease\" ;;\nesac\nexit 0\n",
    );
    must(&["chmod", "755", &script]);
    script
}

/// A stub DNS server on UDP port 53 of argv[1]: answers A for NAME.example.test with
/// 198.51.100.N (N = argv[2]) and TTL 300, a TXT of 40 strings (over 512 bytes) for
/// big.example.test, NXDOMAIN for the rest.
pub const STUB_DNS_SERVER: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
tag = int(sys.argv[2])
while True:
    q, peer = s.recvfrom(4096)
    if len(q) < 12:
        continue
    qid, flags, qd = struct.unpack("!HHH", q[:6])
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode().lower())
        i += 1 + q[i]
    qtype = struct.unpack("!H", q[i + 1:i + 3])[0]
    question = q[12:i + 5]
    name = ".".join(labels)
    answers = b""
    rcode = 0
    if name == "big.example.test" and qtype == 16:
        txt = b"".join(bytes([20]) + b"x" * 20 for _ in range(40))
        answers = b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, 300, len(txt)) + txt
    elif name.endswith(".example.test") and qtype == 1:
        answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([198, 51, 100, tag])
    elif not name.endswith(".example.test"):
        rcode = 3
    an = 1 if answers else 0
    head = struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, an, 0, 0)
    s.sendto(head + question + answers, peer)
"#;

/// Sends one UDP super-frame: from port argv[3] (0: any) to argv[1]:argv[2], ten datagrams of
/// argv[4] bytes (default 1200; byte i is i % 251) in ONE `send` with `UDP_SEGMENT` (103), so
/// the kernel hands the interface (or its own GSO) ten datagrams' worth as one frame; argv[5]
/// `df` sets DF on them.
pub const USO_SENDER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[3]) if len(sys.argv) > 3 else 0))
size = int(sys.argv[4]) if len(sys.argv) > 4 else 1200
if len(sys.argv) > 5 and sys.argv[5] == "df":
    # IP_MTU_DISCOVER = IP_PMTUDISC_DO: DF on every datagram (the default sets it on a
    # super-frame only when the whole of it fits the route's MTU).
    s.setsockopt(socket.IPPROTO_IP, 10, 2)
s.setsockopt(socket.SOL_UDP, 103, size)
s.connect((sys.argv[1], int(sys.argv[2])))
assert s.send(bytes(i % 251 for i in range(10 * size))) == 10 * size
"#;

/// Waits (10 s at most) for one datagram on argv[1]:argv[2] and answers its sender with what
/// [`USO_SENDER`] sends, in one `UDP_SEGMENT` send; prints the sender's address.
pub const USO_ANSWERER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(10)
_, peer = s.recvfrom(65535)
s.setsockopt(socket.SOL_UDP, 103, 1200)
assert s.sendto(bytes(i % 251 for i in range(12000)), peer) == 12000
print("%s:%d" % peer)
"#;

/// Receives the datagrams of one [`USO_SENDER`] send on argv[1]:argv[2] (bounded: until 10
/// arrived or none for 5 s) and prints "COUNT SIZES intact|damaged FROM": intact when datagram
/// k holds bytes 1200k.. of the sender's 12000, in order. With argv[3] and argv[4], it first
/// sends one datagram there (to a [`USO_ANSWERER`]).
pub const USO_RECEIVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(5)
if len(sys.argv) > 4:
    s.sendto(b"hello", (sys.argv[3], int(sys.argv[4])))
want = bytes(i % 251 for i in range(12000))
got, peer = [], None
try:
    while len(got) < 10:
        data, peer = s.recvfrom(65535)
        got.append(data)
except socket.timeout:
    pass
intact = b"".join(got) == want and all(len(g) == 1200 for g in got)
print(len(got), ",".join(str(len(g)) for g in got), "intact" if intact else "damaged",
      "%s:%d" % peer if peer else "-")
"#;

/// What [`USO_RECEIVER`] prints for the ten 1200-byte datagrams of one send from `from`.
/// Asserts that `trace` (a `switchyard trace` of the USO sender's port) shows exactly one
/// frame, the sender's 12000-byte super-frame (10 x 1200), and the line `also`.
pub fn assert_one_uso_frame(trace: &str, also: &str) {
    assert!(
        trace.contains("frame 1:") && !trace.contains("frame 2:"),
        "one frame crossed:\n{trace}"
    );
    assert!(
        trace.contains("[GSO UDP (type 5), segments of 1200], 12042 bytes") && trace.contains(also),
        "expected {also:?}:\n{trace}"
    );
}

pub fn uso_received_from(from: &str) -> String {
    format!("10 {} intact {from}", ["1200"; 10].join(","))
}

/// Starts [`USO_RECEIVER`] on `addr`:`port` inside `ns` and returns once it is bound; join the
/// handle for what it printed.
pub fn uso_receiver(ns: &Netns, addr: &str, port: u16) -> std::thread::JoinHandle<String> {
    let handle = python_in(ns, USO_RECEIVER, &[addr, &port.to_string()]);
    wait_udp_bound(ns, port);
    handle
}

/// Starts [`USO_ANSWERER`] on `addr`:`port` inside `ns` and returns once it is bound; join the
/// handle for the address it answered.
pub fn uso_answerer(ns: &Netns, addr: &str, port: u16) -> std::thread::JoinHandle<String> {
    let handle = python_in(ns, USO_ANSWERER, &[addr, &port.to_string()]);
    wait_udp_bound(ns, port);
    handle
}

/// Starts [`USO_RECEIVER`] on `addr`:`port` inside `ns`, which first sends one datagram to
/// `to` (a [`uso_answerer`]) from there; join the handle for what it printed.
pub fn uso_receiver_asking(
    ns: &Netns,
    addr: &str,
    port: u16,
    to: (&str, u16),
) -> std::thread::JoinHandle<String> {
    let args = [addr, &port.to_string(), to.0, &to.1.to_string()];
    python_in(ns, USO_RECEIVER, &args)
}

/// Runs the python `script` with `args` in `ns` (for 20 s at most) in a thread that returns
/// what it printed.
fn python_in(ns: &Netns, script: &'static str, args: &[&str]) -> std::thread::JoinHandle<String> {
    let name = ns.name.clone();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    std::thread::spawn(move || {
        let mut argv = vec![
            "ip", "netns", "exec", &name, "timeout", "20", "python3", "-c",
        ];
        argv.push(script);
        argv.extend(args.iter().map(String::as_str));
        must(&argv)
    })
}

/// Waits (10 s at most) until a UDP socket in `ns` is bound to `port`.
fn wait_udp_bound(ns: &Netns, port: u16) {
    let needle = format!(":{port} ");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ns.must(&["ss", "-lnu"]).contains(&needle) {
        assert!(Instant::now() < deadline, "nothing bound UDP port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An ordinary user made for one test (no capabilities, no home), removed on drop.
#[derive(Debug)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TestUser {
    pub fn new() -> TestUser {
        require(&["useradd", "userdel", "setpriv"]);
        let name = unique_name("syu");
        must(&[
            "useradd",
            "--no-create-home",
            "--user-group",
            "--shell",
            "/bin/sh",
            &name,
        ]);
        let id = |flag: &str| -> u32 {
            must(&["id", flag, &name])
                .trim()
                .parse()
                .expect("numeric id")
        };
        let (uid, gid) = (id("-u"), id("-g"));
        TestUser { name, uid, gid }
    }

    /// `args` run as this user, without supplementary groups or inheritable capabilities, and
    /// with the system's PATH (root's may name directories the user cannot read).
    pub fn argv<'a>(&'a self, uid: &'a str, gid: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![
            "setpriv",
            "--reuid",
            uid,
            "--regid",
            gid,
            "--clear-groups",
            "--inh-caps=-all",
            "--",
            "env",
            "PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
        ];
        v.extend_from_slice(args);
        v
    }
}

impl Default for TestUser {
    fn default() -> Self {
        TestUser::new()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = run(&["userdel", &self.name]);
    }
}

/// A fresh directory under the temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        TempDir(dir)
    }

    /// Writes `contents` to `name` inside the directory; its path, for command lines.
    pub fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write a file in the temporary directory");
        path.display().to_string()
    }

    /// `name` inside the directory, as a string for command lines.
    pub fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A background process, killed on drop.
#[derive(Debug)]
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The CPUs this test process may run on (`Cpus_allowed_list` of proc(5), expanded).
pub fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim();
    let mut cpus = Vec::new();
    for item in list.split(',') {
        let bound = |s: &str| s.parse::<usize>().expect("a CPU number");
        match item.split_once('-') {
            Some((first, last)) => cpus.extend(bound(first)..=bound(last)),
            None => cpus.push(bound(item)),
        }
    }
    cpus
}

/// Path of the `switchyard` binary built by the same `cargo test` run.
pub fn switchyard_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/switchyard
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("switchyard");
    assert!(
        bin.is_file(),
        "{} not built: run `tests/run.sh` (or `cargo build --workspace --bins` first)",
        bin.display()
    );
    bin
}

/// A running `switchyard`, stopped with SIGTERM on drop.
#[derive(Debug)]
pub struct Switchyard {
    child: Option<Child>,
    stderr: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

impl Switchyard {
    /// Starts `switchyard args...` and waits for it to report that it runs.
    pub fn start(args: &[&str]) -> Switchyard {
        Self::start_in(None, args)
    }

    /// Like [`Switchyard::start`], inside network namespace `ns` (`ip netns exec` execs, so the
    /// child is switchyard itself).
    pub fn start_in(ns: Option<&Netns>, args: &[&str]) -> Switchyard {
        Self::start_in_env(ns, args, &[])
    }

    /// [`Switchyard::start_in`] with `env` added to switchyard's environment.
    pub fn start_in_env(ns: Option<&Netns>, args: &[&str], env: &[(&str, &str)]) -> Switchyard {
        let bin = switchyard_bin();
        let mut command = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        command.args(args).envs(env.iter().copied());
        let control = std::env::temp_dir().join(format!("{}.sock", unique_name("syctl")));
        if args.first() == Some(&"run") && !args.contains(&"--control") {
            // Tests run in parallel, many on the same network name: one socket each.
            command.arg("--control").arg(&control);
        }
        if args.first() == Some(&"run") && !args.contains(&"--resolv-conf") {
            // Never the machine's resolvers: DNS upstreams only where a test names them.
            command.arg("--resolv-conf").arg("/dev/null");
        }
        if args.first() == Some(&"run") && !args.contains(&"--state-dir") {
            // ... and one lease file each, thrown away (tests of restarts pass their own).
            let state = std::env::temp_dir().join(unique_name("systate"));
            command.arg("--state-dir").arg(&state);
        }
        Self::start_command(command)
    }

    /// Starts `command` (a switchyard, perhaps wrapped in `ip netns exec`, `setpriv` ...)
    /// as it is, and waits until it runs.
    pub fn start_command(mut command: Command) -> Switchyard {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start switchyard");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut sy = Switchyard {
            child: Some(child),
            stderr: rx,
            log: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match sy.stderr.recv_timeout(left) {
                Ok(line) => {
                    let running = line.contains(" running with ");
                    sy.log.push(line);
                    if running {
                        return sy;
                    }
                }
                Err(_) => {
                    let status = sy.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                    panic!(
                        "switchyard did not start ({status:?}):\n{}",
                        sy.log.join("\n")
                    );
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Sends `signal` (e.g. "TERM"), waits for the exit, and returns (success, stdout, stderr).
    pub fn stop_with(&mut self, signal: &str) -> (bool, String, String) {
        let mut child = self.child.take().expect("running");
        must(&["kill", &format!("-{signal}"), &child.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("switchyard ignored SIG{signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stdout = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut out, &mut stdout);
        }
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(500)) {
            self.log.push(line);
        }
        (status.success(), stdout, self.log.join("\n"))
    }

    /// Stops with SIGTERM and returns the final counters (run with `--json`).
    pub fn stop_json(&mut self) -> serde_json::Value {
        let (ok, stdout, stderr) = self.stop_with("TERM");
        assert!(ok, "switchyard exited with failure:\n{stderr}");
        let last = stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no stats printed:\n{stderr}"));
        serde_json::from_str(last).expect("stats JSON")
    }
}

impl Drop for Switchyard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }
}

/// The throughput the receiver counted in an `iperf3 -J` report, bit/s (0 when absent).
pub fn iperf3_received_bps(report: &str) -> f64 {
    let json: serde_json::Value = serde_json::from_str(report).expect("iperf3 JSON");
    let end = &json["end"];
    end["sum_received"]["bits_per_second"]
        .as_f64()
        .or_else(|| end["sum"]["bits_per_second"].as_f64())
        .unwrap_or(0.0)
}

/// `switchyard stats --json` of the network whose control socket is `control`.
pub fn stats_of(control: &str) -> serde_json::Value {
    let bin = switchyard_bin();
    let out = must(&[
        bin.to_str().unwrap_or("switchyard"),
        "stats",
        "--json",
        "--socket",
        control,
    ]);
    serde_json::from_str(out.trim()).expect("stats JSON")
}

/// The counters of port `index` from `switchyard --json` stats.
pub fn port_counters(stats: &serde_json::Value, index: usize) -> &serde_json::Value {
    &stats["ports"][index][1]["counters"]
}

/// A minimal VM speaking QEMU's stream netdev framing, at 52:54:00:5e:00:01 and argv[4]
/// (default 192.168.122.20), on the unix socket argv[1] (or `tcp:ADDR:PORT`, QEMU's older
/// `-netdev socket`): resolves argv[2] by ARP, pings it
/// (ICMP echo, checks the reply), answers ARP and echo for itself meanwhile (and for argv[3]
/// more seconds), and prints the peer's MAC. Exits 1 on a timeout (bounded: 5 s).
pub const QEMU_LIKE_CLIENT: &str = r#"
import socket, struct, sys, time
path, target = sys.argv[1], socket.inet_aton(sys.argv[2])
me_mac = bytes.fromhex("5254005e0001")
me_ip = socket.inet_aton(sys.argv[4] if len(sys.argv) > 4 else "192.168.122.20")
if path.startswith("tcp:"):
    host, port = path[4:].rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
s.settimeout(0.2)
buf = b""
def send(frame):
    s.sendall(struct.pack("!I", len(frame)) + frame)
def frames():
    global buf
    try:
        data = s.recv(65536)
        if not data:
            sys.exit("closed")
        buf += data
    except socket.timeout:
        pass
    while len(buf) >= 4:
        n = struct.unpack("!I", buf[:4])[0]
        if len(buf) < 4 + n:
            break
        yield buf[4:4 + n]
        buf = buf[4 + n:]
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16: t = (t & 0xffff) + (t >> 16)
    return ~t & 0xffff
def arp(op, dst_mac, tha, tpa):
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, me_mac, me_ip, tha, tpa)
    return dst_mac + me_mac + b"\x08\x06" + body
def ipv4(dst_mac, dst_ip, proto, payload):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, me_ip, dst_ip)
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return dst_mac + me_mac + b"\x08\x00" + h + payload
def icmp(kind, ident, seq, data):
    m = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    return m[:2] + struct.pack("!H", csum(m)) + m[4:]
def answer(f):
    # Be a good neighbour: answer ARP and ping for ourselves.
    if f[12:14] == b"\x08\x06" and f[38:42] == me_ip and f[20:22] == b"\x00\x01":
        send(arp(2, f[6:12], f[22:28], f[28:32]))
    elif f[12:14] == b"\x08\x00" and f[30:34] == me_ip and f[23] == 1 and f[34] == 8:
        send(ipv4(f[6:12], f[26:30], 1, icmp(0, *struct.unpack("!HH", f[38:42]), f[42:])))
deadline = time.time() + 5
peer = None
send(arp(1, b"\xff" * 6, bytes(6), target))
while peer is None:
    if time.time() > deadline: sys.exit("no ARP reply")
    for f in frames():
        if f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02" and f[28:32] == target:
            peer = f[22:28]
        else:
            answer(f)
send(ipv4(peer, target, 1, icmp(8, 0x77, 1, b"switchyard")))
while True:
    if time.time() > deadline: sys.exit("no echo reply")
    got = False
    for f in frames():
        if f[12:14] == b"\x08\x00" and f[26:30] == target and f[23] == 1 and f[34] == 0:
            got = True
        else:
            answer(f)
    if got: break
# Stay a moment so the other side can ping us, answering.
if len(sys.argv) > 3 and float(sys.argv[3]) > 0:
    end = time.time() + float(sys.argv[3])
    while time.time() < end:
        for f in frames():
            answer(f)
print(peer.hex(":"))
"#;

/// `switchyard trace NETWORK --socket SOCKET ARGS...` running in the background, its output
/// collected; it is given a moment to start before traffic is sent.
#[derive(Debug)]
pub struct Tracer(Child);

impl Tracer {
    pub fn start(network: &str, socket: &str, args: &[&str]) -> Tracer {
        let child = Command::new(switchyard_bin())
            .args(["trace", network, "--socket", socket])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start switchyard trace");
        std::thread::sleep(Duration::from_millis(400));
        Tracer(child)
    }

    /// Waits for the trace to end (its count or duration) and returns what it printed.
    /// A trace of the USO sender's frames (UDP to port 9000) on the network `default`.
    pub fn uso(control: &str) -> Tracer {
        Tracer::start(
            "default",
            control,
            &[
                "--count",
                "20",
                "--filter",
                "udp and port 9000",
                "--duration",
                "3",
            ],
        )
    }

    pub fn output(self) -> String {
        let out = self.0.wait_with_output().expect("switchyard trace");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A UDP server in the outside namespace that answers each datagram with the address and
/// port it came from: what the outside sees of a guest.
pub const UDP_REFLECTOR: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("203.0.113.1", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(("%s:%d" % peer).encode(), peer)
"#;

/// Asks the reflector at argv[1] argv[2] times, each from a new socket (a new source port),
/// as a stub resolver does; then opens a TCP connection to argv[3]. Prints how many answers
/// came back, then "tcp ok".
pub const MANY_QUERIES: &str = r#"
import socket, sys
answered = 0
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(b"q", ("203.0.113.1", int(sys.argv[1])))
    try:
        s.recvfrom(100)
        answered += 1
    except socket.timeout:
        pass
    s.close()
print(answered, flush=True)
c = socket.create_connection(("203.0.113.1", int(sys.argv[3])), timeout=5)
c.close()
print("tcp ok", flush=True)
"#;

/// A TCP server in the outside namespace that accepts and closes, for ever.
pub const TCP_ACCEPTOR: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("203.0.113.1", int(sys.argv[1])))
s.listen(16)
while True:
    s.accept()[0].close()
"#;
