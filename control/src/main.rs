//! `switchyard`: a userspace virtual switch and NAT for libvirt-style networks.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use control::daemon;
use control::run::{self, RunOptions};
use datapath::io::TapSpec;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "switchyard",
    version,
    about = "A userspace virtual switch and NAT for libvirt-style networks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one network in the foreground from a libvirt network XML file (default: libvirt's
    /// default network, embedded).
    Run {
        /// libvirt network XML; omitted = the embedded default.xml
        xml: Option<PathBuf>,
        /// A tap port: NAME[@NETNS][=MAC][,filter=clean-traffic|none]. NETNS is an `ip netns`
        /// name or a path such as /proc/PID/ns/net; MAC is set on the kernel side; the filter
        /// overrides the network's clean-traffic for this port. Repeat for more ports.
        #[arg(long = "tap", value_name = "NAME[@NETNS][=MAC][,filter=F]")]
        taps: Vec<TapSpec>,
        /// A VM port: a unix socket for `qemu -netdev stream,...,addr.type=unix,addr.path=PATH`
        /// (4-byte big-endian length before each frame), or `tcp:127.0.0.1:PORT` for
        /// `-netdev socket,connect=127.0.0.1:PORT`. Repeat for more VMs.
        #[arg(long = "stream", value_name = "PATH|tcp:ADDR:PORT")]
        streams: Vec<String>,
        /// Seconds before an idle MAC is forgotten (the Linux bridge's ageing_time).
        #[arg(long, default_value_t = 300)]
        fdb_aging: u64,
        /// Largest number of MACs the switch learns.
        #[arg(long, default_value_t = datapath::switch::DEFAULT_CAPACITY)]
        fdb_max: usize,
        /// Print counters as JSON lines on stdout instead of tables on stderr.
        #[arg(long)]
        json: bool,
        /// Control socket (default /run/switchyard/NETWORK.sock).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Where the DHCP lease file NETWORK.leases is kept (default /var/lib/switchyard as
        /// root, else $XDG_STATE_HOME/switchyard).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The resolver configuration whose nameservers are the DNS upstreams when the network
        /// has no <forwarder> (re-read when it changes).
        #[arg(long, default_value = "/etc/resolv.conf")]
        resolv_conf: PathBuf,
        /// Serve Prometheus metrics over HTTP on this loopback address (`GET /metrics`).
        #[arg(long, value_name = "127.0.0.1:PORT")]
        metrics: Option<std::net::SocketAddr>,
        /// Microseconds to keep polling without sleeping after a busy turn (as SO_BUSY_POLL):
        /// lower latency for a core kept busy meanwhile. 0 sleeps at once.
        #[arg(long, default_value_t = 0, value_name = "MICROSECONDS")]
        busy_poll_us: u64,
        /// Threads that carry the taps' frames: taps get one queue per worker, and workers
        /// past the first switch known unicast between taps on their own (see
        /// benches/WORKERS.md). 1 (the default) is one thread for everything.
        #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
        workers: u16,
        #[command(flatten)]
        placement: PlacementArgs,
        /// The datapath's seccomp allow-list: `enforce` (a call off the list kills the
        /// process), `log` (allowed and logged by the kernel, see dmesg) or `off`.
        #[arg(long, default_value = "enforce", value_name = "enforce|log|off")]
        seccomp: datapath::io::seccomp::SeccompMode,
    },
    /// List the DHCP leases of a running network, like `virsh net-dhcp-leases NAME`.
    NetDhcpLeases {
        /// The network's name.
        name: Option<String>,
        /// The control socket itself.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// JSON instead of virsh's table.
        #[arg(long)]
        json: bool,
    },
    /// List NAT's connections of a running network, like `conntrack -L`.
    Conntrack {
        #[command(flatten)]
        target: Target,
        /// JSON instead of conntrack's text layout.
        #[arg(long)]
        json: bool,
    },
    /// Forward host ports to guests of a running socket NAT network (as `<sy:forward>` does
    /// at start), stop forwarding one, or list them.
    PortForward {
        #[command(subcommand)]
        action: PortForwardAction,
        /// The network's name (its control socket is net-NAME.sock in /run/switchyard, or
        /// beside $SWITCHYARD_SOCKET).
        #[arg(long, default_value = "default", global = true)]
        network: String,
        /// The control socket itself.
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
    },
    /// Show the uplink's ARP cache (next hops) of a running network.
    Neighbors {
        #[command(flatten)]
        target: Target,
    },
    /// The counters of a running network in Prometheus' text format.
    Metrics {
        #[command(flatten)]
        target: Target,
    },
    /// Print the counters of a running network as JSON (`--json` is accepted, and is what
    /// it always prints; `run` prints the tables).
    Stats {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Host every started network and answer the net-* commands (as libvirtd does).
    Daemon {
        /// The control socket (mode 0600).
        #[arg(long, env = "SWITCHYARD_SOCKET")]
        socket: Option<PathBuf>,
        /// Defined networks, autostart marks and lease files (default /var/lib/switchyard as
        /// root, else $XDG_STATE_HOME/switchyard).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Where DNS upstreams come from when a network has no <forwarder>.
        #[arg(long, default_value = "/etc/resolv.conf")]
        resolv_conf: PathBuf,
        /// The datapath's seccomp allow-list: `enforce` (a call off the list kills the
        /// process), `log` (allowed and logged by the kernel, see dmesg) or `off`.
        #[arg(long, default_value = "enforce", value_name = "enforce|log|off")]
        seccomp: datapath::io::seccomp::SeccompMode,
        /// Threads per network that carry its taps' frames (as `run --workers`).
        #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
        workers: u16,
        /// Where every network's threads run (as `run --cpus`, `--realtime`).
        #[command(flatten)]
        placement: PlacementArgs,
    },
    /// Define (or redefine) a network from its libvirt XML file.
    NetDefine {
        file: PathBuf,
        #[command(flatten)]
        daemon: DaemonArg,
    },
    /// Forget a defined network (a running one keeps running, transient).
    NetUndefine {
        name: String,
        #[command(flatten)]
        daemon: DaemonArg,
    },
    /// Start a defined network.
    NetStart {
        name: String,
        #[command(flatten)]
        daemon: DaemonArg,
    },
    /// Stop a running network (its taps go away; the definition stays).
    NetDestroy {
        name: String,
        #[command(flatten)]
        daemon: DaemonArg,
    },
    /// Start the network whenever the daemon starts (or not, with --disable).
    NetAutostart {
        name: String,
        #[arg(long)]
        disable: bool,
        #[command(flatten)]
        daemon: DaemonArg,
    },
    /// List the networks: active ones, or all with --all.
    NetList {
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        daemon: DaemonArg,
    },
    /// Name, UUID, state, autostart and bridge of a network.
    NetInfo {
        name: String,
        #[command(flatten)]
        daemon: DaemonArg,
    },
    /// The network's XML, with the uuid and MAC generated at definition: as it runs, or as
    /// the next start will use it (--inactive).
    NetDumpxml {
        name: String,
        #[arg(long)]
        inactive: bool,
        #[command(flatten)]
        daemon: DaemonArg,
    },
    /// Attach a tap to a network (as `virsh attach-interface`): now (--current, the
    /// default), from the next start (--config), or both (--persistent).
    AttachInterface {
        #[arg(long)]
        network: String,
        /// `tap`, or `stream` for a QEMU VM (`-netdev stream,addr.type=unix,addr.path=SOCKET`).
        #[arg(long = "type", default_value = "tap")]
        kind: String,
        /// The tap's name (created inside --netns if it does not exist).
        #[arg(long, required_unless_present = "socket")]
        target: Option<String>,
        /// With --type stream: the unix socket QEMU connects to (created now), or
        /// `tcp:127.0.0.1:PORT` for QEMU's older `-netdev socket,connect=`.
        #[arg(long)]
        socket: Option<String>,
        /// The namespace the tap lives in: an `ip netns` name or a path.
        #[arg(long)]
        netns: Option<String>,
        /// MAC address of the kernel side.
        #[arg(long)]
        mac: Option<String>,
        /// `clean-traffic` or `none`: this port's spoofing filter, over the network's
        /// `<sy:guard clean-traffic>` (libvirt's `<filterref>` on one interface).
        #[arg(long, value_parser = ["clean-traffic", "none"])]
        filter: Option<String>,
        #[arg(long, default_value = "virtio")]
        model: String,
        #[command(flatten)]
        when: When,
        #[command(flatten)]
        daemon: DaemonArg,
    },
    /// Detach a tap from a network, by name or MAC.
    DetachInterface {
        #[arg(long)]
        network: String,
        #[arg(long, required_unless_present = "mac")]
        target: Option<String>,
        #[arg(long)]
        mac: Option<String>,
        #[command(flatten)]
        when: When,
        #[command(flatten)]
        daemon: DaemonArg,
    },
    /// The taps of a running network, their MACs and leased addresses.
    IfaceList {
        /// The network's name.
        network: String,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// The learned MACs of a running network (like `brctl showmacs`).
    Fdb {
        /// The network's name.
        network: String,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Follow live frames through the pipeline: for each, the frame as it came in, every
    /// decision (counters moved: MAC learned, NAT flow created or found, ARP/echo/DHCP/DNS
    /// answered, ICMP error sent, drop reason), the frame as rewritten, and the verdict.
    Trace {
        /// The network's name.
        network: String,
        /// Only frames entering this port (a number, a name, or a tap name); default any.
        #[arg(long)]
        port: Option<String>,
        /// Only frames matching all these words: arp, ip, ipv6, icmp, tcp, udp, host A.B.C.D,
        /// port N, ether MAC (joined by `and`), e.g. "tcp and port 80".
        #[arg(long, value_name = "EXPR")]
        filter: Option<String>,
        /// Stop after this many frames.
        #[arg(long, default_value_t = 20)]
        count: u64,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<f64>,
        /// Instead of live frames, run this frame through the pipeline as if it entered
        /// --port, sending nothing: a file of hexadecimal bytes, or a pcap (its first frame).
        #[arg(long, value_name = "FILE")]
        inject: Option<PathBuf>,
        /// The network's control socket itself.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Capture a port's frames, both ways, into a pcap file (tcpdump -r reads it): as they
    /// enter the switch and as they leave it, so on the uplink the NATed packets.
    Capture {
        /// The network's name.
        network: String,
        /// The port: its number or name (see `switchyard stats`), or a tap name.
        #[arg(long)]
        port: String,
        /// The pcap file; `-` for standard output.
        #[arg(short = 'w', default_value = "-")]
        write: String,
        /// Stop after this many frames.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<f64>,
        /// The network's control socket itself.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Build guests in fresh network namespaces, switch them, and show what happens.
    Demo {
        /// Leave the namespaces and the switch up until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
}

/// Where the datapath's threads run (`datapath::io::placement`).
#[derive(clap::Args, Debug)]
struct PlacementArgs {
    /// Pin the datapath's threads to these CPUs, one per thread in turn, the engine's first
    /// (`1,0`; ranges as `2-3`; the list repeats if shorter). Default: any CPU.
    #[arg(long, value_name = "LIST", value_parser = CpuList::parse)]
    cpus: Option<CpuList>,
    /// Run the datapath's threads under SCHED_RR at this priority (1-99), ahead of ordinary
    /// processes, as the kernel's own forwarding is. Needs CAP_SYS_NICE (root) or an
    /// RLIMIT_RTPRIO. Default: the normal scheduler.
    #[arg(long, value_name = "PRIORITY", value_parser = clap::value_parser!(u8).range(1..=99))]
    realtime: Option<u8>,
}

/// `--cpus`, parsed whole (clap would take a bare `Vec` for repeated options).
#[derive(Debug, Clone)]
struct CpuList(Vec<usize>);

impl CpuList {
    fn parse(text: &str) -> Result<CpuList, String> {
        datapath::io::placement::parse_cpus(text).map(CpuList)
    }
}

impl From<PlacementArgs> for datapath::io::Placement {
    fn from(args: PlacementArgs) -> Self {
        datapath::io::Placement {
            cpus: args.cpus.map(|c| c.0).unwrap_or_default(),
            realtime: args.realtime,
        }
    }
}

/// virsh's --current / --config / --persistent.
#[derive(clap::Args, Debug)]
#[group(multiple = false)]
struct When {
    /// The running network only (the default).
    #[arg(long)]
    current: bool,
    /// The definition only: takes effect at the next start.
    #[arg(long)]
    config: bool,
    /// Both.
    #[arg(long)]
    persistent: bool,
}

impl When {
    /// (live, config)
    fn targets(&self) -> (bool, bool) {
        match (self.config, self.persistent) {
            (true, _) => (false, true),
            (_, true) => (true, true),
            _ => (true, false),
        }
    }
}

/// Which daemon to ask.
#[derive(clap::Args, Debug)]
struct DaemonArg {
    /// The daemon's socket (default /run/switchyard/daemon.sock).
    #[arg(long = "connect", env = "SWITCHYARD_SOCKET", value_name = "SOCKET")]
    connect: Option<PathBuf>,
    /// The daemon's answer as JSON instead of virsh's text.
    #[arg(long)]
    json: bool,
}

impl DaemonArg {
    fn ask(&self, request: &daemon::Request) -> Result<serde_json::Value, String> {
        let socket = self.connect.clone().unwrap_or_else(daemon::default_socket);
        daemon::request(&socket, request)
    }
}

impl DaemonArg {
    /// Asks, then prints `human` or, with --json, the answer's data (`null` for plain
    /// success).
    fn act(
        &self,
        request: &daemon::Request,
        human: impl FnOnce(&serde_json::Value) -> Result<String, String>,
    ) -> Result<(), String> {
        let data = self.ask(request)?;
        if self.json {
            println!("{}", serde_json::json!({ "ok": true, "data": data }));
        } else {
            print!("{}", human(&data)?);
        }
        Ok(())
    }
}

#[derive(Subcommand, Debug)]
enum PortForwardAction {
    /// Forward HOST (ADDR:PORT, e.g. 127.0.0.1:8080) to GUEST (ADDR:PORT).
    Add {
        host: String,
        guest: String,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        proto: String,
    },
    /// Stop forwarding HOST.
    Remove {
        host: String,
        #[arg(long, default_value = "tcp")]
        proto: String,
    },
    /// The forwarded ports.
    List {
        #[arg(long)]
        json: bool,
    },
}

/// Which running network to ask.
#[derive(clap::Args, Debug)]
struct Target {
    /// The network's name (as `--network`).
    #[arg(value_name = "NETWORK")]
    name: Option<String>,
    /// The network's name (its control socket is net-NAME.sock in /run/switchyard, or beside
    /// $SWITCHYARD_SOCKET).
    #[arg(long, default_value = "default")]
    network: String,
    /// The control socket itself.
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl Target {
    fn ask(&self, request: &str) -> Result<(), String> {
        let network = self.name.as_deref().unwrap_or(&self.network);
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(|| run::default_control_socket(network));
        print!("{}", run::ask(&socket, request)?);
        Ok(())
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(datapath::io::netns::TAP_HELPER_ARG) {
        // A helper opening a tap inside a user namespace's network namespace: it must stay
        // single-threaded, so it runs before anything else.
        return ExitCode::from(datapath::io::netns::tap_helper_main(&args[2..]) as u8);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            xml,
            taps,
            streams,
            fdb_aging,
            fdb_max,
            json,
            control,
            state_dir,
            resolv_conf,
            metrics,
            busy_poll_us,
            workers,
            placement,
            seccomp,
        } => run::run(&RunOptions {
            xml,
            taps,
            streams,
            fdb_aging: Duration::from_secs(fdb_aging),
            fdb_max,
            json,
            control,
            state_dir,
            resolv_conf,
            metrics,
            seccomp,
            busy_poll: Duration::from_micros(busy_poll_us),
            workers: usize::from(workers),
            placement: placement.into(),
        }),
        Command::NetDhcpLeases { name, socket, json } => Target {
            name,
            network: "default".into(),
            socket,
        }
        .ask(if json { "leases json" } else { "leases" }),
        Command::Conntrack { target, json } => {
            target.ask(if json { "conntrack json" } else { "conntrack" })
        }
        Command::PortForward {
            action,
            network,
            socket,
        } => {
            let target = Target {
                name: None,
                network,
                socket,
            };
            target.ask(&match action {
                PortForwardAction::Add { host, guest, proto } => {
                    format!("forward add {proto} {host} {guest}")
                }
                PortForwardAction::Remove { host, proto } => {
                    format!("forward remove {proto} {host}")
                }
                PortForwardAction::List { json: true } => "forward list json".into(),
                PortForwardAction::List { json: false } => "forward list".into(),
            })
        }
        Command::Neighbors { target } => target.ask("neighbors"),
        Command::Stats { target, json: _ } => target.ask("stats"),
        Command::Metrics { target } => {
            let name = target
                .name
                .clone()
                .unwrap_or_else(|| target.network.clone());
            target.ask(&format!("metrics {name}"))
        }
        Command::Demo { keep } => control::demo::demo(keep),
        Command::Daemon {
            socket,
            state_dir,
            resolv_conf,
            seccomp,
            workers,
            placement,
        } => daemon::daemon(&daemon::DaemonOptions {
            socket: socket.unwrap_or_else(daemon::default_socket),
            state_dir: state_dir.unwrap_or_else(run::default_state_dir),
            resolv_conf,
            seccomp,
            workers: usize::from(workers),
            placement: placement.into(),
        }),
        Command::NetDefine { file, daemon } => std::fs::read_to_string(&file)
            .map_err(|e| format!("{}: {e}", file.display()))
            .and_then(|xml| {
                daemon.act(&daemon::Request::NetDefine { xml }, |name| {
                    Ok(format!(
                        "Network {} defined from {}\n",
                        name.as_str().unwrap_or_default(),
                        file.display()
                    ))
                })
            }),
        Command::NetUndefine { name, daemon } => daemon
            .act(&daemon::Request::NetUndefine { name: name.clone() }, |_| {
                Ok(format!("Network {name} has been undefined\n"))
            }),
        Command::NetStart { name, daemon } => daemon
            .act(&daemon::Request::NetStart { name: name.clone() }, |_| {
                Ok(format!("Network {name} started\n"))
            }),
        Command::NetDestroy { name, daemon } => daemon
            .act(&daemon::Request::NetDestroy { name: name.clone() }, |_| {
                Ok(format!("Network {name} destroyed\n"))
            }),
        Command::NetAutostart {
            name,
            disable,
            daemon,
        } => daemon.act(
            &daemon::Request::NetAutostart {
                name: name.clone(),
                disable,
            },
            |_| {
                Ok(if disable {
                    format!("Network {name} unmarked as autostarted\n")
                } else {
                    format!("Network {name} marked as autostarted\n")
                })
            },
        ),
        Command::NetList { all, daemon } => daemon.act(&daemon::Request::NetList { all }, |rows| {
            let rows: Vec<daemon::ListRow> =
                serde_json::from_value(rows.clone()).map_err(|e| e.to_string())?;
            Ok(daemon::list_table(&rows))
        }),
        Command::NetInfo { name, daemon } => {
            daemon.act(&daemon::Request::NetInfo { name }, |info| {
                let info: daemon::Info =
                    serde_json::from_value(info.clone()).map_err(|e| e.to_string())?;
                Ok(daemon::info_text(&info))
            })
        }
        Command::AttachInterface {
            network,
            kind,
            target,
            socket,
            netns,
            mac,
            filter,
            model,
            when,
            daemon,
        } => {
            let (live, config) = when.targets();
            let request = match (kind.as_str(), target, socket) {
                _ if model != "virtio" => Err(format!("--model {model}: only virtio")),
                ("tap", Some(target), None) => Ok(daemon::Request::AttachInterface {
                    network,
                    target,
                    netns,
                    mac,
                    filter,
                    live,
                    config,
                }),
                ("stream", None, Some(socket)) => Ok(daemon::Request::AttachStream {
                    network,
                    socket,
                    live,
                    config,
                }),
                ("tap", ..) => Err("--type tap takes --target NAME (not --socket)".into()),
                ("stream", ..) => Err("--type stream takes --socket PATH (not --target)".into()),
                (other, ..) => Err(format!("--type {other}: tap or stream")),
            };
            request.and_then(|request| {
                daemon
                    .ask(&request)
                    .map(|_| println!("Interface attached successfully"))
            })
        }
        Command::DetachInterface {
            network,
            target,
            mac,
            when,
            daemon,
        } => {
            let (live, config) = when.targets();
            daemon.act(
                &daemon::Request::DetachInterface {
                    network,
                    target: target.or(mac).unwrap_or_default(),
                    live,
                    config,
                },
                |_| Ok("Interface detached successfully\n".into()),
            )
        }
        Command::IfaceList {
            network,
            json,
            socket,
        } => Target {
            name: None,
            network,
            socket,
        }
        .ask(if json {
            "iface-list json"
        } else {
            "iface-list"
        }),
        Command::Fdb {
            network,
            json,
            socket,
        } => Target {
            name: None,
            network,
            socket,
        }
        .ask(if json { "fdb json" } else { "fdb" }),
        Command::Trace {
            network,
            port,
            filter,
            count,
            duration,
            inject,
            socket,
        } => {
            let socket = socket.unwrap_or_else(|| run::default_control_socket(&network));
            match inject {
                Some(file) => control::capture::inject(&socket, port.as_deref(), &file),
                None => control::capture::trace(
                    &socket,
                    port.as_deref(),
                    filter.as_deref().unwrap_or(""),
                    count,
                    duration.map(Duration::from_secs_f64),
                ),
            }
        }
        Command::Capture {
            network,
            port,
            write,
            count,
            duration,
            socket,
        } => control::capture::capture(&control::capture::CaptureOptions {
            socket: socket.unwrap_or_else(|| run::default_control_socket(&network)),
            port,
            write,
            count,
            duration: duration.map(Duration::from_secs_f64),
        }),
        Command::NetDumpxml {
            name,
            inactive,
            daemon,
        } => daemon.act(&daemon::Request::NetDumpxml { name, inactive }, |xml| {
            Ok(xml.as_str().unwrap_or_default().to_string())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: error: {e}");
            ExitCode::FAILURE
        }
    }
}
