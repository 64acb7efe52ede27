//! `switchyard run`: one network in the foreground, ports given on the command line.

use crate::network::{DEFAULT_XML, ForwardMode, NetworkDef, UplinkRx};
use crate::report;
use datapath::io::control::Answer;
use datapath::io::{Datapath, Tap, TapSpec};
use datapath::{Config, Engine};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything `run` needs, from the command line.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub xml: Option<PathBuf>,
    pub taps: Vec<TapSpec>,
    /// QEMU stream sockets to make (VM ports): paths, or `tcp:127.0.0.1:PORT`.
    pub streams: Vec<String>,
    pub fdb_aging: Duration,
    pub fdb_max: usize,
    pub json: bool,
    /// Control socket; `None` = [`default_control_socket`] of the network.
    pub control: Option<PathBuf>,
    /// Where the lease file lives; `None` = [`default_state_dir`].
    pub state_dir: Option<PathBuf>,
    /// The resolver configuration whose nameservers are the DNS upstreams when the network
    /// names no `<forwarder>` (`/etc/resolv.conf`).
    pub resolv_conf: PathBuf,
    /// A loopback address to serve Prometheus metrics on (`GET /metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// The datapath thread's seccomp allow-list, installed once the ports are open.
    pub seccomp: datapath::io::seccomp::SeccompMode,
    /// Polling without sleeping after a busy turn ([`Datapath::set_busy_poll`]).
    pub busy_poll: Duration,
    /// Threads for the taps' frames ([`Datapath::set_workers`]); 1 is the engine's alone.
    pub workers: usize,
    /// Where those threads run ([`Datapath::set_placement`]).
    pub placement: datapath::io::Placement,
}

/// Where a network's lasting state (the DHCP lease file) is kept: `/var/lib/switchyard` as
/// root, else `$XDG_STATE_HOME/switchyard` (or `~/.local/state/switchyard`).
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/switchyard");
    }
    match (std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME")) {
        (Some(dir), _) => PathBuf::from(dir).join("switchyard"),
        (None, Some(home)) => PathBuf::from(home).join(".local/state/switchyard"),
        (None, None) => PathBuf::from("/var/lib/switchyard"),
    }
}

/// Where switchyard keeps its sockets: `/run/switchyard` as root, else
/// `$XDG_RUNTIME_DIR/switchyard`.
pub fn run_dir() -> PathBuf {
    let base = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !is_root() => PathBuf::from(dir),
        _ => PathBuf::from("/run"),
    };
    base.join("switchyard")
}

/// Where a network listens for `switchyard conntrack` and friends: `net-NAME.sock` beside the
/// daemon's socket when `$SWITCHYARD_SOCKET` names one, else in [`run_dir`]. `run` and the
/// daemon use the same place, so the commands find a network however it was started.
pub fn default_control_socket(network: &str) -> PathBuf {
    match std::env::var_os("SWITCHYARD_SOCKET") {
        Some(daemon) => crate::daemon::network_socket(Path::new(&daemon), network),
        None => run_dir().join(format!("net-{network}.sock")),
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// A tap as `switchyard iface-list` shows it (virsh `domiflist` + `domifaddr`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IfaceRow {
    pub interface: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The namespace the tap lives in, or `-`.
    pub source: String,
    pub model: String,
    pub mac: String,
    /// From the MAC's DHCP lease, with the prefix.
    pub ip: String,
}

/// `iface-list` layout.
pub fn iface_table(rows: &[IfaceRow]) -> String {
    let w = |f: fn(&IfaceRow) -> &str, title: &str| {
        rows.iter()
            .map(|r| f(r).len())
            .max()
            .unwrap_or(0)
            .max(title.len())
    };
    let (wi, ws, wm) = (
        w(|r| &r.interface, "Interface"),
        w(|r| &r.source, "Source"),
        w(|r| &r.mac, "MAC"),
    );
    let mut out = format!(
        " {:<wi$}   {:<5}   {:<ws$}   {:<6}   {:<wm$}   IP address\n",
        "Interface", "Type", "Source", "Model", "MAC"
    );
    out.push_str(&format!("{}\n", "-".repeat(wi + ws + wm + 40)));
    for r in rows {
        out.push_str(&format!(
            " {:<wi$}   {:<5}   {:<ws$}   {:<6}   {:<wm$}   {}\n",
            r.interface, r.kind, r.source, r.model, r.mac, r.ip
        ));
    }
    out
}

fn iface_rows(dp: &Datapath) -> Vec<IfaceRow> {
    let engine = dp.engine();
    let fdb = engine.fdb_rows(std::time::Instant::now());
    let lease_of = |mac: Option<&str>| {
        engine.dhcp().and_then(|d| {
            let mac = mac?;
            let lease = d
                .leases()
                .find(|l| dhcp_dns::dhcp::format_mac(&l.mac) == mac)?;
            Some(format!("{}/{}", lease.ip, d.config().prefix))
        })
    };
    let streams = dp.streams().into_iter().map(|(port, addr, connected)| {
        let mac = fdb.iter().find(|r| r.port == port).map(|r| r.mac.clone());
        IfaceRow {
            interface: if connected { "vm" } else { "(waiting)" }.into(),
            kind: "stream".into(),
            source: addr.to_string(),
            model: "virtio".into(),
            ip: lease_of(mac.as_deref()).unwrap_or_else(|| "-".into()),
            mac: mac.unwrap_or_else(|| "-".into()),
        }
    });
    let taps: Vec<IfaceRow> = dp
        .taps()
        .into_iter()
        .map(|(port, name, netns, mac)| {
            let mac = mac
                .map(|m| m.to_string())
                .or_else(|| fdb.iter().find(|r| r.port == port).map(|r| r.mac.clone()));
            let ip = engine.dhcp().and_then(|d| {
                let mac = mac.as_deref()?;
                let lease = d
                    .leases()
                    .find(|l| dhcp_dns::dhcp::format_mac(&l.mac) == mac)?;
                Some(format!("{}/{}", lease.ip, d.config().prefix))
            });
            IfaceRow {
                interface: name,
                kind: "tap".into(),
                source: netns
                    .map(|p| {
                        p.strip_prefix(datapath::io::netns::NETNS_RUN_DIR)
                            .unwrap_or(&p)
                            .display()
                            .to_string()
                    })
                    .unwrap_or_else(|| "-".into()),
                model: "virtio".into(),
                mac: mac.unwrap_or_else(|| "-".into()),
                ip: ip.unwrap_or_else(|| "-".into()),
            }
        })
        .collect();
    taps.into_iter().chain(streams).collect()
}

/// `attach tap SPEC`: opens the tap (created inside its namespace) and adds it as a port.
fn attach(dp: &mut Datapath, spec: &str) -> String {
    let spec: TapSpec = match spec.parse() {
        Ok(spec) => spec,
        Err(e) => return format!("error: {e}\n"),
    };
    if dp
        .taps()
        .iter()
        .any(|(_, name, netns, _)| *name == spec.name && *netns == spec.netns)
    {
        return format!("error: interface {spec} is already attached\n");
    }
    match dp.open_tap(&spec) {
        Ok(id) => format!("port {id}\n"),
        Err(e) => format!("error: tap {spec}: {e}\n"),
    }
}

/// `attach stream SPEC`: a VM port on a new unix socket (or loopback TCP `tcp:ADDR:PORT`).
fn attach_stream(dp: &mut Datapath, spec: &str) -> String {
    match add_stream(dp, spec) {
        Ok(id) => format!("port {id}\n"),
        Err(e) => format!("error: {e}\n"),
    }
}

fn add_stream(dp: &mut Datapath, spec: &str) -> Result<datapath::PortId, String> {
    let addr = datapath::io::stream::StreamAddr::parse(spec).map_err(|e| e.to_string())?;
    dp.add_stream(format!("{addr}(stream)"), &addr)
        .map_err(|e| format!("stream {addr}: {e}"))
}

/// The port a user names: its number, or its name (`eth0@vm1`, `eth1(uplink)`, ...), or the
/// tap name alone.
fn find_port(dp: &Datapath, name: &str) -> Option<datapath::PortId> {
    let engine = dp.engine();
    if name == "gateway" {
        return Some(datapath::io::capture::GATEWAY);
    }
    if let Ok(n) = name.parse::<u16>() {
        let id = datapath::PortId(n);
        return engine.port(id).map(|_| id);
    }
    engine
        .ports()
        .find(|(_, p)| p.name == name || p.name.split('@').next() == Some(name))
        .map(|(id, _)| id)
}

/// `trace start PORT|any COUNT [FILTER...]`, `trace read`, `trace stop` (answered with a
/// last `trace read`), `trace inject PORT HEX`.
fn trace(dp: &mut Datapath, request: &str) -> String {
    let words: Vec<&str> = request.split_whitespace().collect();
    match words.as_slice() {
        ["start", port, count, filter @ ..] => {
            let filter = match datapath::trace::Filter::parse(&filter.join(" ")) {
                Ok(f) => f,
                Err(e) => return format!("error: --filter: {e}\n"),
            };
            let Ok(count) = count.parse::<u64>() else {
                return format!("error: trace count {count}: a number\n");
            };
            let port = match *port {
                "any" => None,
                name => match find_port(dp, name) {
                    Some(id) => Some(id),
                    None => return format!("error: no port {name} on this network\n"),
                },
            };
            dp.start_trace(port, count, filter);
            "tracing\n".into()
        }
        ["read"] => dp
            .read_trace()
            .unwrap_or_else(|| "error: no trace is running\n".into()),
        ["inject", port, hex] => {
            let Some(port) = find_port(dp, port) else {
                return format!("error: no port {port} on this network\n");
            };
            match datapath::io::capture::unhex(hex) {
                Some(frame) if !frame.is_empty() => {
                    dp.inject_trace(std::time::Instant::now(), port, &frame)
                }
                _ => "error: the frame must be hexadecimal bytes\n".into(),
            }
        }
        ["stop"] => {
            // What was traced since the last read, and the final counts, then the end.
            let last = dp.read_trace().unwrap_or_default();
            dp.stop_trace();
            format!("{last}stopped\n")
        }
        _ => "error: trace start PORT|any COUNT, trace read, trace stop, trace inject PORT HEX\n"
            .into(),
    }
}

/// `capture start|read|stop PORT`.
fn capture(dp: &mut Datapath, request: &str) -> String {
    let mut words = request.split_whitespace();
    let (Some(verb), Some(name)) = (words.next(), words.next()) else {
        return "error: capture start|read|stop PORT\n".into();
    };
    let Some(port) = find_port(dp, name) else {
        return format!("error: no port {name} on this network\n");
    };
    match verb {
        "start" => match dp.start_capture(port) {
            Ok(()) => format!("capturing port {port}\n"),
            Err(e) => format!("error: {e}\n"),
        },
        "read" => dp
            .read_capture(port)
            .unwrap_or_else(|| format!("error: port {port} is not being captured\n")),
        "stop" => match dp.stop_capture(port) {
            Some((captured, dropped)) => format!("{captured} captured, {dropped} dropped\n"),
            None => format!("error: port {port} is not being captured\n"),
        },
        other => format!("error: capture {other}: start, read or stop\n"),
    }
}

/// `detach TARGET`: removes the tap named TARGET (`NAME`, or `NAME@NETNS`) or with MAC
/// TARGET.
fn detach(dp: &mut Datapath, target: &str) -> String {
    let rows = iface_rows(dp);
    let found = dp
        .taps()
        .into_iter()
        .zip(rows)
        .find(|((_, name, _, _), row)| {
            *name == target
                || format!("{name}@{}", row.source) == target
                || row.mac.eq_ignore_ascii_case(target)
        });
    let found = found.map(|((port, ..), _)| port).or_else(|| {
        dp.streams()
            .into_iter()
            .find(|(_, addr, _)| addr.to_string() == target)
            .map(|(port, ..)| port)
    });
    match found {
        Some(port) => {
            dp.remove_port(port);
            "ok\n".into()
        }
        None => format!("error: no interface {target} on this network\n"),
    }
}

/// `forward add PROTO HOST GUEST`, `forward remove PROTO HOST`, `forward list [json]`: the
/// live port forwards of a socket NAT network.
fn port_forward(dp: &mut Datapath, request: &str) -> String {
    let proto = |p: &str| match p {
        "tcp" => Ok("tcp"),
        "udp" => Ok("udp"),
        other => Err(format!("error: protocol {other}: tcp or udp\n")),
    };
    let words: Vec<&str> = request.split_whitespace().collect();
    let result = match words.as_slice() {
        ["add", p, host, guest] => (|| {
            let forward = datapath::io::egress::Forward {
                proto: proto(p)?,
                host: host
                    .parse()
                    .map_err(|e| format!("error: host {host}: {e}\n"))?,
                guest: guest
                    .parse()
                    .map_err(|e| format!("error: guest {guest}: {e}\n"))?,
            };
            dp.add_forward(forward)
                .map(|()| "ok\n".to_string())
                .map_err(|e| format!("error: {p} {host}: {e}\n"))
        })(),
        ["remove", p, host] => (|| {
            let p = proto(p)?;
            let addr = host
                .parse()
                .map_err(|e| format!("error: host {host}: {e}\n"))?;
            if dp.remove_forward(p, addr) {
                Ok("ok\n".to_string())
            } else {
                Err(format!("error: {p} {host} is not forwarded\n"))
            }
        })(),
        ["list"] => Ok(dp
            .forwards()
            .iter()
            .map(|f| format!("{} {} -> {}\n", f.proto, f.host, f.guest))
            .collect()),
        ["list", "json"] => Ok(serde_json::to_string(&dp.forwards())
            .map(|s| s + "\n")
            .unwrap_or_else(|e| format!("error: {e}\n"))),
        _ => Err("error: forward add PROTO HOST GUEST | remove PROTO HOST | list [json]\n".into()),
    };
    result.unwrap_or_else(|e| e)
}

/// Answers one control request: `conntrack [json]`, `neighbors`, `stats`, `leases [json]`,
/// `dns`, `fdb [json]`, `iface-list [json]`, `attach tap SPEC`, `detach TARGET`.
pub fn answer(dp: &mut Datapath, request: &str) -> Answer {
    let now = std::time::Instant::now();
    match request {
        "conntrack" => {
            let rows = dp.conntrack_later(now);
            Answer::Later(Box::new(move || {
                let rows = rows();
                let mut out: String = rows.iter().map(|r| format!("{r}\n")).collect();
                out.push_str(&format!(
                    "switchyard conntrack: {} flow entries have been shown.\n",
                    rows.len()
                ));
                out
            }))
        }
        "conntrack json" => {
            let rows = dp.conntrack_later(now);
            Answer::Later(Box::new(move || json_line(serde_json::to_string(&rows()))))
        }
        // With the taps' kernel counters, read off the datapath's thread.
        "stats" => {
            let stats = dp.stats_later();
            Answer::Later(Box::new(move || json_line(serde_json::to_string(&stats()))))
        }
        "metrics" => {
            let stats = dp.stats_later();
            Answer::Later(Box::new(move || report::prometheus("", &stats())))
        }
        other if other.starts_with("metrics ") => {
            let network = other["metrics ".len()..].trim().to_string();
            let stats = dp.stats_later();
            Answer::Later(Box::new(move || report::prometheus(&network, &stats())))
        }
        other => answer_now(dp, other, now).into(),
    }
}

fn json_line(v: Result<String, serde_json::Error>) -> String {
    match v {
        Ok(s) => s + "\n",
        Err(e) => format!("error: {e}\n"),
    }
}

/// The answers the datapath's thread makes at once.
fn answer_now(dp: &mut Datapath, request: &str, now: std::time::Instant) -> String {
    let json = json_line;
    if let Some(spec) = request.strip_prefix("attach tap ") {
        return attach(dp, spec.trim());
    }
    if let Some(spec) = request.strip_prefix("attach stream ") {
        return attach_stream(dp, spec.trim());
    }
    if let Some(target) = request.strip_prefix("detach ") {
        return detach(dp, target.trim());
    }
    if let Some(rest) = request.strip_prefix("capture ") {
        return capture(dp, rest);
    }
    if let Some(rest) = request.strip_prefix("trace ") {
        return trace(dp, rest);
    }
    if let Some(rest) = request.strip_prefix("forward ") {
        return port_forward(dp, rest);
    }
    let engine = dp.engine();
    match request {
        "neighbors" => json(serde_json::to_string(&engine.neighbors())),
        "leases" => match engine.dhcp() {
            Some(d) => dhcp_dns::dhcp::format_lease_table(d.leases(), d.config().prefix),
            None => "error: this network serves no DHCP\n".into(),
        },
        "dns" => match engine.dns() {
            Some(d) => {
                let mut out = String::new();
                for (name, ip) in d.server().names() {
                    out.push_str(&format!("{ip}\t{name}\n"));
                }
                out
            }
            None => "error: this network serves no DNS\n".into(),
        },
        "leases json" => json(serde_json::to_string(
            &engine
                .dhcp()
                .map(|d| d.leases().cloned().collect::<Vec<_>>())
                .unwrap_or_default(),
        )),
        "fdb" => report::fdb_table(&engine.fdb_rows(now), |id| {
            engine
                .port(datapath::PortId(id))
                .map(|p| p.name.clone())
                .unwrap_or_default()
        }),
        "fdb json" => json(serde_json::to_string(&engine.fdb_rows(now))),
        "iface-list" => iface_table(&iface_rows(dp)),
        "iface-list json" => json(serde_json::to_string(&iface_rows(dp))),
        other => format!(
            "error: unknown request {other:?}; try conntrack, neighbors, stats, leases, dns, \
             fdb, iface-list\n"
        ),
    }
}

/// Sends `request` to the engine listening on `socket` and returns its answer.
pub fn ask(socket: &std::path::Path, request: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        format!(
            "{}: {e} (is `switchyard run` running for this network?)",
            socket.display()
        )
    })?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    match reply.strip_prefix("error: ") {
        Some(e) => Err(e.trim().to_string()),
        None => Ok(reply),
    }
}

/// Reads the network definition, or the embedded default.
pub fn load_network(path: Option<&PathBuf>) -> Result<NetworkDef, String> {
    let (xml, origin) = match path {
        Some(p) => (
            std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            DEFAULT_XML.to_string(),
            "embedded default network".to_string(),
        ),
    };
    NetworkDef::parse(&xml).map_err(|e| format!("{origin}: {e}"))
}

/// The receive ring the uplink gets when `<sy:uplink rx='ring'>` asks for one.
fn uplink_ring(def: &NetworkDef) -> Option<datapath::io::sys::RingLayout> {
    match def
        .sy_uplink
        .as_ref()
        .and_then(|u| u.rx)
        .unwrap_or_default()
    {
        UplinkRx::Ring => Some(datapath::io::sys::RingLayout::default()),
        UplinkRx::Read => None,
    }
}

/// Serves DHCP when the network has `<dhcp>`, with the leases of its lease file restored.
/// Returns the lease file's path.
fn enable_dhcp(
    def: &NetworkDef,
    opts: &RunOptions,
    engine: &mut Engine,
) -> Result<Option<PathBuf>, String> {
    let (Some(config), Some(gateway)) = (def.dhcp_config()?, def.gateway()) else {
        return Ok(None);
    };
    let dir = opts.state_dir.clone().unwrap_or_else(default_state_dir);
    let path = dir.join(format!("{}.leases", def.name));
    let leases = match std::fs::read_to_string(&path) {
        Ok(text) => dhcp_dns::dhcp::parse_lease_file(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("lease file {}: {e}", path.display())),
    };
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    eprintln!(
        "switchyard: DHCP {}-{} on {} ({} leases restored from {})",
        config.range.0,
        config.range.1,
        gateway.ip,
        leases.len(),
        path.display()
    );
    let server = dhcp_dns::dhcp::DhcpServer::new(config, leases, unix);
    let service = datapath::dhcp::DhcpService::new(
        server,
        gateway.mac,
        true,
        (std::time::Instant::now(), unix),
    );
    engine.enable_dhcp(service);
    Ok(Some(path))
}

/// Answers DNS on the gateway unless `<dns enable='no'>`. Returns `None` without DNS, else
/// the resolv.conf to take upstreams from (`None` when `<forwarder>`s name them).
fn enable_dns(def: &NetworkDef, opts: &RunOptions, engine: &mut Engine) -> Option<Option<PathBuf>> {
    let (config, from_resolv_conf) = def.dns_config()?;
    let gateway = def.gateway()?;
    let resolv_conf = from_resolv_conf.then(|| opts.resolv_conf.clone());
    eprintln!(
        "switchyard: DNS on {}:53 (domain {}), upstream {}",
        gateway.ip,
        config.domain.as_deref().unwrap_or("-"),
        match &resolv_conf {
            Some(path) => format!("from {}", path.display()),
            None => format!("{:?}", config.upstreams),
        }
    );
    let server = dhcp_dns::dns::DnsServer::new(config);
    let mtu = usize::from(def.mtu.unwrap_or(1500));
    let service = datapath::dns::DnsService::new(server, gateway.mac, gateway.ip).with_tcp(
        gateway.prefix,
        mtu,
        std::time::Instant::now(),
    );
    engine.enable_dns(service);
    Some(resolv_conf)
}

/// Builds the datapath for `def` with the taps of `taps` attached.
pub fn build(def: &NetworkDef, opts: &RunOptions) -> Result<Datapath, String> {
    let uplink_dev = def
        .forward
        .as_ref()
        .filter(|f| f.mode == ForwardMode::Nat && !def.uses_socket_nat())
        .and_then(|f| f.dev.clone());
    let nat = match &uplink_dev {
        Some(dev) => {
            let mtu = datapath::io::sys::interface_mtu(dev)
                .map_err(|e| format!("<forward dev='{dev}'>: {e}"))?;
            def.nat_setup(mtu.min(u16::MAX as u32) as u16)?
        }
        None => None,
    };
    let bridge_dev = def.bridge_dev();
    let config = Config {
        mtu: def.mtu.unwrap_or(1500),
        fdb_capacity: opts.fdb_max,
        fdb_aging: opts.fdb_aging,
        // Bridge mode: guests are on the LAN; the LAN's router, DHCP and DNS serve them.
        gateway: if bridge_dev.is_some() {
            None
        } else {
            def.gateway()
        },
        nat: nat.clone(),
        socket_nat: def.socket_nat_setup(),
        guard: def.sy_guard,
    };
    let mut engine = Engine::new(&config);
    let leases = match bridge_dev {
        Some(_) => None,
        None => enable_dhcp(def, opts, &mut engine)?,
    };
    let resolv_conf = match bridge_dev {
        Some(_) => None,
        None => enable_dns(def, opts, &mut engine),
    };
    let mut dp = Datapath::new(engine).map_err(|e| format!("poll: {e}"))?;
    let workers = def.sy_datapath.workers.map_or(opts.workers, usize::from);
    dp.set_workers(workers)
        .map_err(|e| format!("workers: {e}"))?;
    let placement = def.sy_datapath.placement(&opts.placement);
    if !placement.is_default() {
        placement.check()?;
        eprintln!("switchyard: datapath threads on {}", placement.describe());
    }
    dp.set_placement(placement);
    if let Some(path) = leases {
        dp.persist_leases(&path)
            .map_err(|e| format!("lease file {}: {e}", path.display()))?;
    }
    if let Some(resolv_conf) = resolv_conf {
        dp.enable_upstream_dns()
            .map_err(|e| format!("DNS upstream sockets: {e}"))?;
        if let Some(path) = resolv_conf {
            dp.watch_resolv_conf(&path);
        }
    }
    if let (Some(dev), Some((nat, uplink))) = (&uplink_dev, &nat) {
        let id = dp
            .add_uplink(dev, uplink_ring(def))
            .map_err(|e| format!("uplink {dev}: {e}"))?;
        eprintln!(
            "switchyard: port {id}: uplink {dev} (AF_PACKET, promiscuous, mtu {}): external \
             address {}/{} at {}, next hop {}; NAT ports {}-{}, filtering {:?}",
            uplink.mtu,
            uplink.ip,
            uplink.prefix,
            uplink.mac,
            uplink
                .gateway
                .map_or("on-link only".to_string(), |g| g.to_string()),
            nat.ports.0,
            nat.ports.1,
            nat.filtering
        );
    }
    if config.guard.is_active() {
        let g = config.guard;
        let rate = |n: u32| {
            if n == 0 {
                "-".to_string()
            } else {
                format!("{n}/s")
            }
        };
        eprintln!(
            "switchyard: guard: clean-traffic {}, per port DHCP {}, DNS {}, broadcast {}",
            if g.clean_traffic { "on" } else { "off" },
            rate(g.dhcp_per_second),
            rate(g.dns_per_second),
            rate(g.broadcast_per_second)
        );
    }
    if let Some(config) = &config.socket_nat {
        eprintln!(
            "switchyard: NAT through host sockets (TCP via a userspace stack, UDP ports {}-{}, \
             ping sockets where net.ipv4.ping_group_range allows){}",
            config.ports.0,
            config.ports.1,
            if config.host_loopback {
                format!("; {} stands for the host's 127.0.0.1", config.gateway)
            } else {
                String::new()
            }
        );
        for forward in &def.sy_forwards {
            dp.add_forward(forward.to_datapath())
                .map_err(|e| format!("<sy:forward host='{}'>: {e}", forward.host))?;
            eprintln!(
                "switchyard: forwarding {} {} to guest {}",
                forward.proto, forward.host, forward.guest
            );
        }
    } else if let Some(forward) = def.sy_forwards.first() {
        return Err(format!(
            "<sy:forward host='{}'>: port forwarding needs socket NAT",
            forward.host
        ));
    }
    if let Some(dev) = &bridge_dev {
        let id = dp
            .add_nic_port(dev, uplink_ring(def))
            .map_err(|e| format!("<forward mode='bridge'> dev {dev}: {e}"))?;
        eprintln!(
            "switchyard: port {id}: host NIC {dev} (AF_PACKET, promiscuous): bridge mode, guests \
             are on its LAN; no gateway, DHCP or DNS of switchyard's"
        );
    }
    for spec in &opts.streams {
        let id = add_stream(&mut dp, spec)?;
        let qemu = match spec.strip_prefix("tcp:") {
            Some(addr) => format!("-netdev socket,id=n0,connect={addr}"),
            None => format!("-netdev stream,id=n0,server=off,addr.type=unix,addr.path={spec}"),
        };
        eprintln!("switchyard: port {id}: VM socket {spec} (qemu {qemu})");
    }
    for spec in &opts.taps {
        let mut spec = spec.clone();
        // The guest's side of the tap gets the network's MTU, as libvirt gives its taps.
        spec.mtu = spec.mtu.or(def.mtu.map(u32::from));
        let spec = &spec;
        let tap = Tap::open_queues(spec, dp.workers()).map_err(|e| format!("tap {spec}: {e}"))?;
        let how = if tap.created { "created" } else { "attached" };
        let name = tap.name.clone();
        let id = dp.add_tap(tap).map_err(|e| format!("tap {spec}: {e}"))?;
        let place = spec
            .netns
            .as_ref()
            .map(|p| format!(" in {}", p.display()))
            .unwrap_or_default();
        eprintln!("switchyard: port {id}: tap {name} ({how}){place}");
    }
    Ok(dp)
}

/// The counters at exit, with the taps' kernel counters (read here: nothing waits on this
/// thread any more).
pub fn print_stats(dp: &Datapath, json: bool) {
    let stats = dp.stats_later()();
    if json {
        match serde_json::to_string(&stats) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("switchyard: stats: {e}"),
        }
    } else {
        eprint!("{}", report::stats_table(&stats));
    }
}

/// Builds the network `def` and opens its control socket: ready to run.
pub fn start(def: &NetworkDef, opts: &RunOptions) -> Result<Datapath, String> {
    for line in def.not_yet_implemented() {
        eprintln!("switchyard: note: {line}");
    }
    let mut dp = build(def, opts)?;
    dp.set_busy_poll(opts.busy_poll);
    if let Some(gw) = def.gateway() {
        eprintln!(
            "switchyard: gateway {}/{} at {} (answers ARP, ping, DHCP and DNS)",
            gw.ip, gw.prefix, gw.mac
        );
    }
    let control = opts
        .control
        .clone()
        .unwrap_or_else(|| default_control_socket(&def.name));
    dp.listen_control(&control)
        .map_err(|e| format!("control socket {}: {e}", control.display()))?;
    eprintln!(
        "switchyard: control socket {} (switchyard conntrack --socket ...)",
        control.display()
    );
    if let Some(addr) = opts.metrics {
        dp.listen_metrics(addr)
            .map_err(|e| format!("metrics on {addr}: {e}"))?;
        eprintln!("switchyard: Prometheus metrics on http://{addr}/metrics");
    }
    Ok(dp)
}

/// Least privilege before anything starts (threads inherit it): no-new-privs, and every
/// capability dropped but those a running network may still use
/// ([`datapath::io::sys::KEPT_CAPABILITIES`]). An ordinary user has none to drop.
/// `keep_sys_nice` keeps CAP_SYS_NICE too, for real-time datapath threads (`--realtime`,
/// `<sy:datapath realtime>`).
pub fn drop_privileges(keep_sys_nice: bool) -> Result<(), String> {
    use datapath::io::sys;
    sys::set_no_new_privs().map_err(|e| format!("no-new-privs: {e}"))?;
    let mut keep = sys::KEPT_CAPABILITIES.to_vec();
    if keep_sys_nice {
        keep.push(sys::CAP_SYS_NICE);
    }
    sys::drop_capabilities(&keep).map_err(|e| format!("dropping capabilities: {e}"))
}

/// Puts the calling (datapath) thread under the seccomp allow-list of
/// [`datapath::io::seccomp`]; after [`drop_privileges`], which sets no-new-privs.
pub fn confine(mode: datapath::io::seccomp::SeccompMode) -> Result<(), String> {
    datapath::io::seccomp::confine_this_thread(mode).map_err(|e| e.to_string())?;
    if mode != datapath::io::seccomp::SeccompMode::Off {
        eprintln!("switchyard: datapath under the seccomp allow-list ({mode})");
    }
    Ok(())
}

/// Runs until SIGINT/SIGTERM; SIGUSR1 prints the counters.
pub fn run(opts: &RunOptions) -> Result<(), String> {
    let def = load_network(opts.xml.as_ref())?;
    drop_privileges(opts.placement.realtime.is_some() || def.sy_datapath.realtime.is_some())?;
    let mut dp = start(&def, opts)?;
    dp.install_signal_handlers()
        .map_err(|e| format!("signals: {e}"))?;
    eprintln!(
        "switchyard: network '{}' (switch '{}') running with {} ports; SIGUSR1 prints counters, Ctrl-C stops",
        def.name,
        def.bridge.as_deref().unwrap_or("-"),
        opts.taps.len()
    );
    confine(opts.seccomp)?;
    let json = opts.json;
    dp.run(
        |dp: &Datapath| {
            let stats = dp.stats();
            if json {
                if let Ok(line) = serde_json::to_string(&stats) {
                    println!("{line}");
                }
            } else {
                eprint!("{}", report::stats_table(&stats));
            }
        },
        |dp: &mut Datapath, request: &str| match request {
            "metrics" => answer(dp, &format!("metrics {}", def.name)),
            other => answer(dp, other),
        },
    )
    .map_err(|e| format!("poll loop: {e}"))?;
    eprintln!("switchyard: stopping; removing the taps it created");
    print_stats(&dp, opts.json);
    drop(dp);
    Ok(())
}
